from hrnet.cli import main

raise SystemExit(main())
