"""Build the images from the Dockerfile and run them: `make image-test` (root, network, minutes).

What it does, in order (each step prints what it checked; the first failure stops it):

1. installs podman, buildah and debootstrap with apt when they are missing;
2. bootstraps a Debian bookworm root file system (python3, venv, CA certificates) once, cached
   under .cache/images/, and imports it as the base image (no image registry is needed);
3. builds the cpu, train and gpu targets of the Dockerfile as it is, each with its time and size
   (the gpu target on the plain Debian base, CUDA and cuDNN from onnxruntime-gpu's pip extras);
4. cpu: serves a tiny ONNX model from the image, classifies through it from outside with our
   client (`hrnet classify`) and tritonclient (gRPC and REST), runs the HEALTHCHECK command, asks
   /readyz, checks the server's user and that it cannot write the model volume, then sends
   SIGTERM and expects a clean drain (exit 0);
5. train: a few training steps on the bundled digits, then an ONNX export;
6. gpu: onnxruntime lists CUDAExecutionProvider, and the server starts without a GPU and says so.

`podman run` does not work in every sandbox (setrlimit, cgroups), so containers run through
`buildah from` + `buildah run --isolation chroot`, which shares the host's network: a server
started there is reachable on 127.0.0.1. The image's VOLUME gives every `buildah run` a fresh
empty /models, so the test models are mounted at /srv/testmodels and HRNET_REPO points there.

IMAGE holds what the images promise (ports, user, paths); the script checks the built images
against it and tests/deploy/test_image_contract.py checks the manifests under deploy/ against it.

Usage: python deploy/image_test.py [--targets cpu,train,gpu] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "images"
BASE_IMAGE = "localhost/hrnet-base:bookworm"
SUITE = "bookworm"
APT_PACKAGES = ("podman", "buildah", "debootstrap")

# What the serving images promise; the manifests are tested against the same values.
IMAGE = {
    "names": {"cpu": "localhost/hrnet:cpu", "gpu": "localhost/hrnet:gpu", "train": "localhost/hrnet:train"},
    "ports": {"grpc": 8001, "http": 8000, "metrics": 8002},
    "user": "10001:10001",
    "models": "/models",
    "entrypoint": ["hrnet", "serve"],
    "healthcheck": ["hrnet", "health", "--timeout", "4"],
    "venv": "/opt/hrnet",
}
TEST_MODELS = "/srv/testmodels"  # where the host's test repository is mounted (read-only)
MODEL = "tiny"
SIZE, CLASSES = 32, 10
# The gpu target on the plain Debian base: CUDA and cuDNN as pip packages (onnxruntime-gpu's extras).
GPU_PIP_CUDA = "onnxruntime-gpu[cuda,cudnn]"
# Nothing a lean serving image should carry.
NOT_IN_CPU_IMAGE = ("/usr/bin/gcc", "/usr/bin/cc", "/usr/bin/make", "/src", "/root/.cache/pip")


def say(message: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*cmd: str, check: bool = True, capture: bool = False, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, capture_output=capture, **kw)


class Failure(Exception):
    pass


def expect(condition: bool, what: str, detail: str = "") -> None:
    if not condition:
        raise Failure(f"{what}{': ' + detail if detail else ''}")
    say(f"ok: {what}")


# --- tools and base image ---------------------------------------------------------------------


def ensure_tools() -> None:
    missing = [p for p in APT_PACKAGES if not shutil.which(p, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if missing:
        say(f"installing {' '.join(missing)} with apt")
        sh("apt-get", "update", "-qq")
        sh(
            "apt-get",
            "install",
            "-y",
            "-qq",
            *missing,
            env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
        )


def debian_mirror() -> str:
    """The host's Debian mirror (deb822 or one-line sources), so the base comes from the same place."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if path.exists():
            text = path.read_text()
            match = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s", text, re.M
            )
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_base() -> None:
    """Debian bookworm minbase + python3, venv and CA certificates, bootstrapped once."""
    if sh("podman", "image", "exists", BASE_IMAGE, check=False).returncode == 0:
        say(f"base image {BASE_IMAGE} present")
        return
    tarball = CACHE / f"{SUITE}-rootfs.tar"
    if not tarball.exists():
        rootfs = CACHE / f"{SUITE}-rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        mirror = debian_mirror()
        say(f"debootstrap {SUITE} from {mirror}")
        started = time.monotonic()
        with (CACHE / "debootstrap.log").open("w") as out:
            sh(
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                SUITE,
                str(rootfs),
                mirror,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        (rootfs / "usr/bin/python").unlink(missing_ok=True)
        (rootfs / "usr/bin/python").symlink_to("python3")
        # What a slim base leaves out: apt's downloaded lists and packages, docs, man pages and
        # translations (the images' own apt-get update fetches the lists again).
        for leftover in (
            "var/lib/apt/lists",
            "var/cache/apt",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
        ):
            for path in (rootfs / leftover).glob("*"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        partial = tarball.with_suffix(".partial")
        sh("tar", "-C", str(rootfs), "-cf", str(partial), ".")
        partial.rename(tarball)
        shutil.rmtree(rootfs)
        say(f"bootstrapped in {time.monotonic() - started:.0f} s")
    sh("podman", "import", "--quiet", "--change", "CMD=/bin/bash", str(tarball), BASE_IMAGE, capture=True)


# --- building ----------------------------------------------------------------------------------


def pip_mounts() -> list[str]:
    """The host's CA bundle and pip.conf (its `cert`), so pip in the build trusts what the host does."""
    mounts = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    if Path("/etc/pip.conf").exists():
        # Only the certificate setting: the host's extra indexes and constraints are its own.
        conf = CACHE / "pip.conf"
        conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        mounts += ["-v", f"{conf}:/etc/pip.conf:ro"]
    return mounts


def build(target: str, build_args: dict[str, str]) -> dict[str, float]:
    name = IMAGE["names"][target]
    args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
    say(f"building {name} (--target {target} {' '.join(args)})")
    started = time.monotonic()
    log = CACHE / f"build-{target}.log"
    with log.open("w") as out:
        result = subprocess.run(
            [
                "podman", "build", "--isolation", "chroot", "--format", "docker", "--layers",
                "--target", target, "-t", name, *args, *pip_mounts(), "-f", "Dockerfile", ".",
            ],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise Failure(f"building {name} failed after {seconds:.0f} s; the end of {log}:\n" + tail(log))
    size = int(sh("podman", "image", "inspect", "--format", "{{.Size}}", name, capture=True).stdout)
    say(f"built {name}: {seconds:.0f} s, {size / 1e6:.0f} MB")
    return {"build_s": round(seconds, 1), "size_mb": round(size / 1e6, 1)}


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def config_of(name: str) -> dict:
    """The image's runtime configuration; podman reports the HEALTHCHECK beside it."""
    (info,) = json.loads(sh("podman", "image", "inspect", name, capture=True).stdout)
    return info["Config"] | {"Healthcheck": info.get("Healthcheck") or info["Config"].get("Healthcheck")}


def check_serving_config(name: str, device: str) -> dict:
    """The image's runtime configuration is IMAGE's (and the HEALTHCHECK survived the build)."""
    config = config_of(name)
    env = dict(e.split("=", 1) for e in config["Env"])
    ports = {int(p.split("/")[0]) for p in config.get("ExposedPorts", {})}
    expect(config["User"] == IMAGE["user"], f"{name} runs as {IMAGE['user']}", config["User"])
    expect(ports == set(IMAGE["ports"].values()), f"{name} exposes {sorted(ports)}")
    expect(list(config.get("Volumes", {})) == [IMAGE["models"]], f"{name} has the volume {IMAGE['models']}")
    expect(config["Entrypoint"] == IMAGE["entrypoint"], f"{name} starts {' '.join(config['Entrypoint'])}")
    health = (config.get("Healthcheck") or {}).get("Test", [])
    expect(health == ["CMD", *IMAGE["healthcheck"]], f"{name} keeps its HEALTHCHECK", str(health))
    expect(env.get("HRNET_REPO") == IMAGE["models"], f"{name}: HRNET_REPO={IMAGE['models']}")
    for key, setting in (
        ("grpc", "HRNET_PORT"),
        ("http", "HRNET_HTTP_PORT"),
        ("metrics", "HRNET_METRICS_PORT"),
    ):
        expect(env.get(setting) == str(IMAGE["ports"][key]), f"{name}: {setting}={IMAGE['ports'][key]}")
    expect(env.get("HRNET_DEVICE", "cpu") == device, f"{name}: device {device}")
    return env


# --- running -----------------------------------------------------------------------------------


class Container:
    """`buildah from` a built image; `run` starts a command in it as the image's user."""

    def __init__(self, image: str, mounts: list[str]):
        self.id = sh("buildah", "from", "--pull=never", image, capture=True).stdout.strip()
        self.mounts = mounts

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        envs = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return ["buildah", "run", "--isolation", "chroot", *self.mounts, *envs, self.id, "--", *argv]

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120):
        return subprocess.run(self.command(argv, env), capture_output=True, text=True, timeout=timeout)

    def remove(self) -> None:
        sh("buildah", "rm", self.id, check=False, capture=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_model_repo(root: Path) -> Path:
    """A tiny valid ONNX classifier (`hrnet bench overhead`'s near-free model) as MODEL version 1."""
    from benchmarks.near_free import near_free_model

    near_free_model(root / MODEL / "1" / "model.onnx", SIZE, CLASSES)
    for p in [root, *root.rglob("*")]:  # readable by the image's user, owned by root
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1/0.0.0.0:port (the host sees the container's processes)."""
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


class Server:
    """`hrnet serve` (the image's ENTRYPOINT) in a container, its log kept in a file."""

    def __init__(self, container: Container, entrypoint: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self.log = log.open("w")
        self.process = subprocess.Popen(
            container.command(entrypoint, env), stdout=self.log, stderr=subprocess.STDOUT, text=True
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        """The server's JSON log records (the image sets HRNET_LOG_FORMAT=json); other lines skipped."""
        out = []
        for line in self.text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "msg" in record:
                out.append(record)
        return out

    def wait_healthy(self, container: Container, env: dict[str, str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Failure(f"the server exited with {self.process.returncode}:\n{self.text()[-4000:]}")
            check = container.run(IMAGE["healthcheck"], env, timeout=30)
            if check.returncode == 0:
                expect(True, f"HEALTHCHECK ({' '.join(IMAGE['healthcheck'])}) says {check.stdout.strip()}")
                return
            time.sleep(1)
        raise Failure(f"not healthy within {seconds:.0f} s:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def serving_env(device_env: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    """HRNET_REPO at the mounted test models; the image's ports unless one is taken on this host
    (containers share its network), then free ones, said aloud."""
    ports = dict(IMAGE["ports"])
    env = {"HRNET_REPO": TEST_MODELS} | device_env
    if not all(port_free(p) for p in ports.values()):
        for key, setting in (
            ("grpc", "HRNET_PORT"),
            ("http", "HRNET_HTTP_PORT"),
            ("metrics", "HRNET_METRICS_PORT"),
        ):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports[key] = s.getsockname()[1]
            env[setting] = str(ports[key])
        say(f"the image's ports are taken on this host: using {ports}")
    return env, ports


def test_cpu(work: Path) -> dict:
    name = IMAGE["names"]["cpu"]
    check_serving_config(name, "cpu")
    models = write_model_repo(work / "models")
    container = Container(name, ["-v", f"{models}:{TEST_MODELS}:ro"])
    results: dict[str, object] = {}
    try:
        for path in NOT_IN_CPU_IMAGE:
            found = container.run(["test", "-e", path]).returncode == 0
            expect(not found, f"the cpu image has no {path}")
        site = f"{IMAGE['venv']}/lib/python3.11/site-packages"
        # /usr/share/python-wheels: the base's python3-venv (ensurepip), not a cache of ours.
        leftovers = container.run(
            [
                "sh",
                "-c",
                f"find / -xdev -name '*.whl' -not -path '/usr/share/python-wheels/*'; ls -d {site}/tests",
            ]
        )
        expect(
            leftovers.stdout.strip() == "",
            "no wheels and none of our tests in the cpu image",
            leftovers.stdout,
        )
        env, ports = serving_env({})
        server = Server(container, config_of(name)["Entrypoint"], env, work / "cpu-server.log")
        try:
            server.wait_healthy(container, env, 120)
            results |= classify_from_outside(ports, models, work / "images")
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/readyz", timeout=10) as reply:
                expect(reply.status == 200, f"/readyz on the metrics port answers {reply.status}")
            pid = listening_pid(ports["grpc"])
            expect(pid is not None, f"found the server process listening on {ports['grpc']}")
            import psutil

            uids = psutil.Process(pid).uids()
            expect(uids.real == uids.effective == 10001, "the server runs as uid 10001 (not root)", str(uids))
            whoami = container.run(["sh", "-c", "id -u; id -g"], env).stdout.split()
            expect(whoami == ["10001", "10001"], "commands in the image run as 10001:10001", str(whoami))
            for folder in (TEST_MODELS, IMAGE["models"]):
                probe = container.run(["sh", "-c", f"touch {folder}/written 2>&1"], env)
                expect(probe.returncode != 0, f"the image's user cannot write {folder}", probe.stdout.strip())
            os.kill(pid, signal.SIGTERM)  # what `docker stop` sends
            code = server.process.wait(60)
            log = server.text()
            expect(code == 0, "SIGTERM: the server drains and exits 0", f"exit {code}\n{log[-3000:]}")
            records = server.records()
            expect(bool(records), "the server logs JSON records (HRNET_LOG_FORMAT=json)", log[-2000:])
            drained = [r for r in records if r["msg"] == "drained"]
            expect(
                len(drained) == 1 and drained[0].get("drained") is True,
                "the log says it drained (msg 'drained', drained: true)",
                log[-2000:],
            )
            say(
                "drain log lines:\n    "
                + "\n    ".join(json.dumps(r) for r in records if "drain" in r["msg"])
            )
        finally:
            server.stop()
    finally:
        container.remove()
    return results


def classify_from_outside(ports: dict[str, int], models: Path, images: Path) -> dict:
    """Our CLI client and tritonclient (gRPC, REST) against the server in the container."""
    import numpy as np

    images.mkdir()
    import cv2

    rng = np.random.default_rng(1)
    for i in range(3):
        cv2.imwrite(str(images / f"img{i}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    hrnet = str(Path(sys.executable).parent / "hrnet")
    result = sh(
        hrnet, "classify", "--server", f"127.0.0.1:{ports['grpc']}", "--model", MODEL, str(images),
        capture=True, check=False, timeout=120,
    )  # fmt: skip
    expect(result.returncode == 0, "hrnet classify through the gRPC port", result.stdout + result.stderr)
    expect(all(f"img{i}.png" in result.stdout for i in range(3)), "hrnet classify answered every image")
    batch = rng.normal(0, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    answers = {}
    for proto, module, port in (("grpc", grpcclient, ports["grpc"]), ("http", httpclient, ports["http"])):
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        expect(client.is_server_ready() and client.is_model_ready(MODEL), f"tritonclient.{proto}: ready")
        meta = client.get_model_metadata(MODEL)
        inputs = meta.inputs if proto == "grpc" else meta["inputs"]
        outputs = meta.outputs if proto == "grpc" else meta["outputs"]
        in_name = inputs[0].name if proto == "grpc" else inputs[0]["name"]
        out_name = outputs[0].name if proto == "grpc" else outputs[0]["name"]
        tensor = module.InferInput(in_name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        reply = client.infer(MODEL, [tensor], outputs=[module.InferRequestedOutput(out_name)])
        answers[proto] = reply.as_numpy(out_name)
        expect(answers[proto].shape == (2, CLASSES), f"tritonclient.{proto}: logits {answers[proto].shape}")
    # The model is Conv 1x1 stride SIZE: its logits are w . x[:, :, 0, 0].
    import onnx
    from onnx import numpy_helper

    (weights,) = onnx.load(str(models / MODEL / "1" / "model.onnx")).graph.initializer
    expected = batch[:, :, 0, 0] @ numpy_helper.to_array(weights).reshape(CLASSES, 3).T
    for proto, logits in answers.items():
        expect(np.allclose(logits, expected, atol=1e-4), f"tritonclient.{proto}: the logits are the model's")
    return {"classify_first_answer": result.stdout.strip().splitlines()[:3]}


def test_train(work: Path) -> dict:
    name = IMAGE["names"]["train"]
    runs = work / "train"
    runs.mkdir()
    os.chown(runs, 10001, 10001)
    container = Container(name, ["-v", f"{runs}:/work/runs"])
    try:
        user = container.run(["id", "-u"]).stdout.strip()
        expect(user == "10001", "the train image runs as 10001", user)
        steps = [
            ["hrnet", "data", "digits", "--out", "runs/data/digits"],
            [
                "hrnet", "train", "--config", "hrnet_digits", "--epochs", "1", "--steps-per-epoch", "3",
                "--eval-interval", "1", "--num-workers", "1", "--no-progress",
            ],
        ]  # fmt: skip
        for argv in steps:
            started = time.monotonic()
            result = container.run(argv, timeout=900)
            output = result.stdout + result.stderr
            expect(
                result.returncode == 0,
                f"train image: {' '.join(argv)} ({time.monotonic() - started:.0f} s)",
                output[-3000:],
            )
        checkpoints = sorted((runs / "digits").rglob("*.ckpt"))
        expect(bool(checkpoints), "training wrote a checkpoint", str(list((runs / "digits").rglob("*"))[:20]))
        best = runs / "digits" / "best.ckpt"
        ckpt = f"/work/runs/{(best if best.exists() else checkpoints[-1]).relative_to(runs).as_posix()}"
        result = container.run(
            ["hrnet", "export", "--ckpt", ckpt, "--format", "ONNX", "--out", "/work/runs/digits.onnx"],
            timeout=600,
        )
        expect(
            result.returncode == 0,
            "train image: hrnet export --format ONNX",
            (result.stdout + result.stderr)[-3000:],
        )
        expect((runs / "digits.onnx").stat().st_size > 0, "the export wrote runs/digits.onnx")
    finally:
        container.remove()
    return {"checkpoint": ckpt}


def test_gpu(work: Path) -> dict:
    name = IMAGE["names"]["gpu"]
    check_serving_config(name, "gpu")
    models = write_model_repo(work / "gpu-models")
    container = Container(name, ["-v", f"{models}:{TEST_MODELS}:ro"])
    try:
        code = "import onnxruntime; print(onnxruntime.get_available_providers())"
        providers = container.run(["python", "-c", code])
        expect(
            "CUDAExecutionProvider" in providers.stdout,
            "gpu image: onnxruntime lists CUDAExecutionProvider",
            providers.stdout + providers.stderr,
        )
        # The CUDA and cuDNN that onnxruntime's CUDA provider links, as the dynamic loader finds them.
        libraries = (
            "libcudart.so.13",
            "libcublasLt.so.13",
            "libcublas.so.13",
            "libcudnn.so.9",
            "libcufft.so.12",
        )
        code = f"import ctypes\nfor name in {libraries!r}: ctypes.CDLL(name)"
        loaded = container.run(["python", "-c", code])
        expect(loaded.returncode == 0, f"gpu image: {', '.join(libraries)} load", loaded.stderr[-2000:])
        env, ports = serving_env({})
        server = Server(container, config_of(name)["Entrypoint"], env, work / "gpu-server.log")
        try:
            server.wait_healthy(container, env, 180)
            classify_from_outside(ports, models, work / "gpu-images")
        finally:
            pid = listening_pid(ports["grpc"])
            if pid:
                os.kill(pid, signal.SIGTERM)
                expect(server.process.wait(60) == 0, "gpu image: SIGTERM drains and exits 0")
            server.stop()
        records = server.records()
        (loaded_model,) = [r for r in records if r["msg"] == "loaded model"]
        gpu_here = Path("/dev/nvidiactl").exists()
        found = re.search(r"providers=(\S+)", str(loaded_model.get("backend", "")))
        loaded_with = found.group(1) if found else "?"
        say(f"gpu image: the model loaded with providers={loaded_with} (a GPU on this host: {gpu_here})")
        # Without a GPU, CUDA's provider may only miss the driver's libcuda.so.1 (which the NVIDIA
        # container toolkit mounts on a GPU host), never the CUDA or cuDNN the image carries.
        missing = set(re.findall(r"with error: (\S+): cannot open shared object", server.text()))
        expect(
            not {m for m in missing if re.match(r"lib(cudart|cublas|cudnn|cufft|curand|nvrtc)", m)},
            "gpu image: onnxruntime's CUDA provider finds CUDA and cuDNN (missing only: "
            + (", ".join(sorted(missing)) or "nothing")
            + ")",
        )
        about_device = [
            r
            for r in records
            if re.search(r"gpu|cuda|device|provider", json.dumps(r), re.I) and r is not loaded_model
        ]
        runtime_lines = [
            line for line in server.text().splitlines() if "onnxruntime" in line and "{" not in line[:1]
        ]
        say(
            "gpu image: the server's records about the device:\n    "
            + ("\n    ".join(map(json.dumps, about_device)) or "(none)")
        )
        say("gpu image: onnxruntime's own lines:\n    " + "\n    ".join(line[:300] for line in runtime_lines))
        says_no_gpu = any(
            r["level"] in ("warning", "error")
            and re.search(r"no (gpu|cuda)|(gpu|cuda).*(not|un)available", r["msg"], re.I)
            for r in records
        )
        expect(
            gpu_here or says_no_gpu,
            "gpu image: without a GPU the server says so in a warning of its own (and serves on the CPU)",
        )
    finally:
        container.remove()
    return {
        "providers": providers.stdout.strip(),
        "loaded_with": loaded_with,
        "server_says_no_gpu": says_no_gpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", default="cpu,train,gpu", help="comma-separated, built and tested in this order"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("image-test needs root (apt, debootstrap, podman)", file=sys.stderr)
        return 2
    ensure_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    ensure_base()
    build_args = {
        "cpu": {"PYTHON_IMAGE": BASE_IMAGE},
        "train": {"PYTHON_IMAGE": BASE_IMAGE},
        "gpu": {"CUDA_IMAGE": BASE_IMAGE, "GPU_EXTRA_REQUIREMENTS": GPU_PIP_CUDA},
    }
    tests = {"cpu": test_cpu, "train": test_train, "gpu": test_gpu}
    summary: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="image-test-", dir=CACHE))
    work.chmod(0o755)
    failed = False
    for target in args.targets.split(","):
        try:
            summary[target] = build(target, build_args[target])
            summary[target] |= tests[target](work)
            summary[target]["passed"] = True
        except (Failure, subprocess.SubprocessError, OSError) as exc:
            failed = True
            summary.setdefault(target, {})["passed"] = False
            summary[target]["error"] = str(exc)[-4000:]
            say(f"FAILED: {target}: {exc}")
    (CACHE / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    say("summary (also in .cache/images/summary.json):")
    for target, row in summary.items():
        verdict = "passed" if row.get("passed") else "FAILED"
        say(f"  {target:6} {verdict:7} build {row.get('build_s', '-')} s, size {row.get('size_mb', '-')} MB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
