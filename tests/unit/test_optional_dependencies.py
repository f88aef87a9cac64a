"""What happens without the optional packages: DALI (the ``dali`` extra) and nvImageCodec.

Each case runs in a fresh interpreter in which the package is absent for real: a ``sys.meta_path``
finder placed first answers for it as the import system does for a module that is not installed
(``ModuleNotFoundError`` naming it), so every import of it, ours or DALI's own, fails. Our code is not
patched. The same interpreter without the finder (this one) shows that each check is live: there the
packages are installed (the dev extra pulls in ``augserve[dali]``) and the fast paths run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MISSING_DALI = "backend 'dali' needs NVIDIA DALI: pip install 'augserve[dali]'"

_ABSENT = '''
import sys

BLOCKED = {blocked!r}


class Absent:
    """Answers for the blocked modules as for ones that are not installed."""

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Absent())
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUGSERVE_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return env


def _python(blocked: list[str], body: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run ``body`` in a new interpreter where ``blocked`` (and their submodules) cannot be imported."""
    code = _ABSENT.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- DALI ----------------------------------------------------------------------------------------------


def test_dali_is_installed_here_so_the_checks_below_are_live():
    from pipelines.backends import backend_class, require_backend

    require_backend("dali")  # raises nothing
    assert backend_class("dali").__name__ == "DaliBackend"


@pytest.mark.parametrize("blocked", [["nvidia.dali"], ["nvidia"]], ids=["no-dali", "no-nvidia-wheels"])
def test_building_a_dali_pipeline_without_dali_is_one_clear_error(blocked):
    result = _python(
        blocked,
        """
        import json
        import pipelines
        from pipelines.backends import BackendUnavailable, require_backend

        found = {}
        for name, call in (("build", lambda: pipelines.build("lenet5", backend="dali")), ("require", lambda: require_backend("dali"))):
            try:
                call()
            except BackendUnavailable as exc:
                found[name] = [str(exc), isinstance(exc, ImportError), exc.name]
        pipelines.build("lenet5", backend="albumentations")  # the other backends are unaffected
        print(json.dumps({**found, "dali_imported": any(m.startswith("nvidia.dali") for m in sys.modules)}))
        """,
    )
    found = _last_json(result)
    assert found["build"] == [MISSING_DALI, True, "nvidia.dali"]
    assert found["require"] == [MISSING_DALI, True, "nvidia.dali"]
    assert found["dali_imported"] is False


def test_a_broken_dali_keeps_its_own_error():
    """DALI installed but one of its own dependencies missing: not 'install the extra', so the real error stays."""
    result = _python(
        ["optree"],
        """
        import pipelines
        from pipelines.backends import BackendUnavailable
        try:
            pipelines.build("lenet5", backend="dali")
        except BackendUnavailable as exc:
            print("masked", exc)
        except ModuleNotFoundError as exc:
            print(type(exc).__name__, exc.name)
        """,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["ModuleNotFoundError", "optree"]


def _cli(blocked: list[str], *argv: str) -> subprocess.CompletedProcess:
    return _python(blocked, f"from augserve.cli import main\nsys.exit(main({list(argv)!r}))")


@pytest.mark.parametrize(
    "argv",
    [
        ("serve", "--backend", "dali", "--bind", "tcp://127.0.0.1:*", "--workers", "1"),
        ("worker", "--backend", "dali", "--connect", "tcp://127.0.0.1:9"),
        ("preview", "--backend", "dali", "--pipeline", "lenet5", "--dataset", "digits", "--out", "/dev/null"),
    ],
    ids=["serve", "worker", "preview"],
)
def test_cli_without_dali_says_so_in_one_line(argv):
    """`serve` refuses before it binds or starts a worker, `worker` before it connects."""
    result = _cli(["nvidia.dali"], *argv)
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.strip().splitlines() == [f"augserve: error: {MISSING_DALI}"]
    assert result.stdout == ""


def test_serve_without_local_workers_needs_no_dali(tmp_path):
    """A daemon with --workers 0 runs no backend itself (remote workers bring theirs), so it starts."""
    code = _ABSENT.format(blocked=["nvidia.dali"]) + "from augserve.cli import main\nsys.exit(main(sys.argv[1:]))"
    argv = ["serve", "--backend", "dali", "--workers", "0", "--bind", "tcp://127.0.0.1:*"]
    log = tmp_path / "serve.log"
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, env=_env(), stderr=handle, stdout=handle, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None and "serving on" not in log.read_text():
            time.sleep(0.1)
        text = log.read_text()
        assert "serving on tcp://127.0.0.1:" in text and "0 dali worker(s)" in text, text[-4000:]
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- nvImageCodec ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8), (7, 7), 2)
    path = tmp_path_factory.mktemp("jpeg") / "photo.jpg"
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


# A small box high in the image: at full scale the region decoder is the path taken when installed.
BOX = (100.5, 20.25, 260.0, 120.0)
_DECODE = """
import hashlib, json
from augserve.sources.decode import decode_encoded, read_encoded
from augserve.sources.region_decoder import region_decoder, scaled_region_decoder

array, placement = decode_encoded(read_encoded({path!r}), 3, {box!r})
# The box's own pixels (rows 20-119, columns 100-259): a region decoder may hand out a few columns more.
box_pixels = array[20 - placement.top : 120 - placement.top, 100 - placement.left : 260 - placement.left]
print(json.dumps({{"shape": list(array.shape), "placement": [placement.factor, placement.top, placement.left],
                  "sha256": hashlib.sha256(box_pixels.tobytes()).hexdigest(), "region_decoder": region_decoder() is not None,
                  "scaled_region_decoder": scaled_region_decoder() is not None}}))
"""
_LIBJPEG_REGION = "augserve.sources._libjpeg_region"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nvidia-nvimgcodec-cu13 is a base dependency on Linux only")
def test_nvimgcodec_is_a_base_dependency_and_decodes_regions(jpeg, monkeypatch):
    from augserve.sources import decode
    from augserve.sources.region_decoder import region_decoder

    assert region_decoder() is not None, "nvidia-nvimgcodec-cu13 (a base dependency on Linux) is not importable"
    monkeypatch.setattr(decode, "scaled_region_decoder", lambda: None)  # nvImageCodec is the second choice
    calls = []
    real = decode._decode_opencv
    monkeypatch.setattr(decode, "_decode_opencv", lambda *a: calls.append(a) or real(*a))
    array, placement = decode.decode_encoded(decode.read_encoded(jpeg), 3, BOX)
    assert not calls, "the region decoder should have decoded the box, not OpenCV"
    assert (placement.factor, placement.top, placement.left) == (1, 20, 100)
    assert array.shape == (100, 160, 3)


def _can_compile_against_libjpeg() -> bool:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return False
    probe = subprocess.run([compiler, "-E", "-x", "c", "-"], input="#include <stdio.h>\n#include <jpeglib.h>\n", capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_compile_against_libjpeg(), reason="no C compiler with libjpeg's headers: the region decoder cannot be built here")
def test_the_libjpeg_region_decoder_is_built_here():
    """make's install builds it (setup.py; tools/native_deps.sh gets the headers) where libjpeg's headers
    and a compiler exist; a build that silently lost it would lose the fast decode path."""
    from augserve.sources.region_decoder import scaled_region_decoder

    assert scaled_region_decoder() is not None, "augserve.sources._libjpeg_region was not built: is libjpeg-dev (jpeglib.h) installed?"
    assert scaled_region_decoder().LIBJPEG_TURBO_VERSION_NUMBER >= 1_005_000  # crop and skip-scanlines: libjpeg-turbo 1.5+


@pytest.mark.skipif(not _can_compile_against_libjpeg(), reason="no C compiler with libjpeg's headers: the region decoder cannot be built here")
def test_each_region_decoder_missing_gives_the_same_pixels(jpeg):
    """libjpeg decoder (its iMCU-aligned columns), nvImageCodec (the box at full scale), OpenCV: the same box pixels."""
    code = _DECODE.format(path=str(jpeg), box=BOX)
    here = _last_json(_python([], code))
    no_libjpeg = _last_json(_python([_LIBJPEG_REGION], code))
    opencv = _last_json(_python(["nvidia.nvimgcodec", _LIBJPEG_REGION], code))
    assert here["scaled_region_decoder"] is True and no_libjpeg["scaled_region_decoder"] is False
    assert opencv["region_decoder"] is False and no_libjpeg["region_decoder"] is sys.platform.startswith("linux")
    assert here["sha256"] == no_libjpeg["sha256"] == opencv["sha256"]
    assert here["placement"][:2] == [1, 20] and here["placement"][2] <= 100 and here["shape"][0] == 100
    for result in (no_libjpeg, opencv):
        assert result["placement"] == [1, 20, 100] and result["shape"] == [100, 160, 3]


# nvImageCodec importable but unable to make a decoder (a library of its wheel missing, say): a stand-in
# module in its place, whose Decoder fails as the real one would.
_BROKEN_NVIMGCODEC = """
import logging, types
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
broken = types.ModuleType("nvidia.nvimgcodec")
broken.NVIMGCODEC_DEVICE_CPU_ONLY, broken.CPU_ONLY, broken.Backend = -99, 1, lambda kind: kind
def decoder(**kwargs):
    raise RuntimeError("libnvimgcodec.so.0: cannot open shared object file")
broken.Decoder = decoder
import nvidia
sys.modules["nvidia.nvimgcodec"] = nvidia.nvimgcodec = broken
"""


def test_an_unusable_nvimgcodec_falls_back_to_opencv_with_one_warning(jpeg):
    """One warning per process, then OpenCV: the same pixels, and a second region warns no more."""
    decode = _DECODE.format(path=str(jpeg), box=BOX)
    result = _python([_LIBJPEG_REGION], _BROKEN_NVIMGCODEC + decode + decode)
    broken = _last_json(result)
    here = _last_json(_python([_LIBJPEG_REGION], decode))
    assert broken["region_decoder"] is False
    assert {k: broken[k] for k in ("shape", "placement", "sha256")} == {k: here[k] for k in ("shape", "placement", "sha256")}
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING augserve.sources: nvImageCodec's CPU decoder is unusable (RuntimeError: libnvimgcodec.so.0: cannot open shared object file); JPEG regions are decoded with OpenCV"]


def test_a_gpu_worker_without_nvimgcodec_says_once_that_it_decodes_on_the_cpu():
    """Without nvImageCodec no device decoder is made: one warning naming what to install (a GPU
    worker's throughput would otherwise drop unexplained), however often it is asked."""
    result = _python(
        ["nvidia.nvimgcodec"],
        """
        import json, logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from augserve.sources.device_decoder import device_decoder
        print(json.dumps([device_decoder("cuda:7", 3, threads=5) is None, device_decoder("cuda:7", 3, threads=5) is None]))
        """,
    )
    assert _last_json(result) == [True, True]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING augserve.sources: nvImageCodec is not installed (pip install 'nvidia-nvimgcodec-cu13[all]'), so JPEG files are decoded on the CPU, one at a time, not on cuda:7"]
