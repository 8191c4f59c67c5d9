"""Other servers run beside ours in the same benchmark, on the same model file and the same load.

Each peer lives in its own virtual environment under `runs/peers/` (created on first use,
reused after), so its dependencies never touch ours, and is started on 127.0.0.1 with the
settings a user of that server would pick for this model. Its runtime code is loaded by the
peer itself, never imported here.
"""
