"""Run by test_lifecycle.py in a child process: tritonclient callers in a loop, then their statuses.

tritonclient's generated modules and ours define the same protobuf symbols, so Triton's client
runs alone here. Usage: triton_load.py ADDRESS CALLERS SECONDS. Prints `calling` once calls
succeed, then after SECONDS one JSON object: the number of calls that ended with each status.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def main(address: str, callers: int, seconds: float) -> None:
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    first_ok = threading.Event()
    end = time.monotonic() + seconds

    def call_in_a_loop() -> None:
        client = tc.InferenceServerClient(address)
        image = tc.InferInput("image", [1, 3, 32, 32], "FP32")
        image.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        while time.monotonic() < end:
            try:
                client.infer("hrnet", [image], client_timeout=20)
                code = "OK"
                first_ok.set()
            except InferenceServerException as exc:
                code = str(exc.status()).removeprefix("StatusCode.")
                time.sleep(0.01)
            with lock:
                counts[code] += 1

    threads = [threading.Thread(target=call_in_a_loop) for _ in range(callers)]
    for thread in threads:
        thread.start()
    if first_ok.wait(seconds):
        print("calling", flush=True)
    for thread in threads:
        thread.join()
    print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
