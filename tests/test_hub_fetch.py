"""`mlxft import` / `export` read only the base model's config.json from the hub, never its
weights: run as a user would (a subprocess, huggingface_hub's real download code) against a
local fake hub that records every request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from mlxft.adapters.files import peft_key, save_adapter
from tests.conftest import STORIES

REPO_ID = "fake-org/huge-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The two requests `hf_hub_download` makes for a file (HEAD for its metadata, GET for
    its bytes), for config.json only; anything else is recorded and answered 404."""

    requests: list = []
    config = STORIES.joinpath("config.json").read_bytes()

    def _answer(self, body: bool) -> None:
        type(self).requests.append((self.command, self.path))
        if self.path.split("?")[0] != f"/{REPO_ID}/resolve/main/config.json":
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"config-etag"')
        self.send_header("Content-Length", str(len(self.config)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if body:
            self.wfile.write(self.config)

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def partial_adapter(path):
    """A PEFT adapter on blocks 3-4 of stories260K's 5, naming a hub id as its base: exporting
    it needs the base's block count (mlx-lm counts adapted blocks from the end)."""
    rng = np.random.default_rng(0)
    weights = {}
    for layer in (3, 4):
        module = f"model.layers.{layer}.self_attn.q_proj"
        weights[peft_key(module, "lora_A")] = rng.normal(size=(4, 64)).astype(np.float32)
        weights[peft_key(module, "lora_B")] = rng.normal(size=(64, 4)).astype(np.float32)
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8.0,
        "target_modules": ["q_proj"],
        "layers_to_transform": [3, 4],
        "layers_pattern": "layers",
        "base_model_name_or_path": REPO_ID,
    }
    save_adapter(path, weights, config)
    return path


def mlxft(args, hub: str, home) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(
        HF_ENDPOINT=hub,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
    )
    return subprocess.run(
        [sys.executable, "-m", "mlxft", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_export_and_import_fetch_only_config_json(fake_hub, tmp_path):
    adapter = partial_adapter(tmp_path / "adapter")
    exported = mlxft(
        ["export", "--adapter-path", adapter, "--save-path", tmp_path / "mlx"], fake_hub, tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    # the block count came from the fake hub's config.json: 5 blocks, the last 2 adapted
    mlx_config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert mlx_config["num_layers"] == 2
    imported = mlxft(["import", adapter, "--save-path", tmp_path / "back"], fake_hub, tmp_path)
    assert imported.returncode == 0, imported.stderr
    files = {path.split("?")[0].rsplit("/", 1)[-1] for _, path in FakeHub.requests}
    assert files == {"config.json"}, FakeHub.requests
    assert all(method in ("HEAD", "GET") for method, _ in FakeHub.requests)
