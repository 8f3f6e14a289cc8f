"""What a run trusts: weights are read as tensors only (safetensors, or torch.load(weights_only=True)),
a model's own code runs only with model.trust_remote_code=true, an http reward gives up after its
timeout, and secrets (tokens in the environment, credentials in a URL) reach no file a run writes."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import rlhf_cli
from tests.conftest import QUICK, write_jsonl

# torch.load whose arguments (one level of parentheses inside) lack weights_only=True, unpicklers, remote code.
_TORCH_LOAD = re.compile(r"torch\.load\(((?:[^()]|\([^()]*\))*)\)")
_UNSAFE = {
    "pickle.load": re.compile(r"\b(c?pickle|dill|cloudpickle|marshal)\.loads?\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
}


def unsafe_loads(source: str) -> list[str]:
    """What in `source` could run code hidden in a file it reads."""
    found = [f"torch.load({args})" for args in _TORCH_LOAD.findall(source) if "weights_only=True" not in args]
    return found + [name for name, pattern in _UNSAFE.items() if pattern.search(source)]


def test_the_scan_finds_each_unsafe_load():
    assert unsafe_loads("state = torch.load(path)") == ["torch.load(path)"]
    assert unsafe_loads("state = torch.load(Path(d) / 'x.pt',\n    map_location='cpu')")
    assert not unsafe_loads("state = torch.load(Path(d) / 'x.pt', weights_only=True)")
    assert unsafe_loads("pickle.loads(blob)") == ["pickle.load"]
    assert unsafe_loads("AutoModel.from_pretrained(p, trust_remote_code = True)") == ["trust_remote_code=True"]


def test_the_package_reads_weights_as_tensors_only_and_runs_no_remote_code():
    found = {str(path): unsafe_loads(path.read_text(encoding="utf-8"))
             for path in Path(rlhf_cli.__file__).parent.rglob("*.py")}
    assert not {path: loads for path, loads in found.items() if loads}


def test_trust_remote_code_is_off_unless_set():
    from rlhf_cli.config.schema import EvalModelKeys, ModelConfig

    assert ModelConfig().trust_remote_code is False and EvalModelKeys().trust_remote_code is False


class _WritesMarker:
    """Unpickled, it creates the file `marker`: what a malicious pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_weights(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": _WritesMarker(marker)}, path)


def test_the_malicious_payload_runs_when_unpickled_plainly(tmp_path):
    """The payload of the tests below is real: a plain torch.load would run it."""
    _malicious_weights(tmp_path / "evil.bin", tmp_path / "ran")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert (tmp_path / "ran").exists()


def _one_error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    return line


def test_pickled_weights_that_would_run_code_are_refused_unread(rlhf, tmp_path, saved_tiny):
    (saved_tiny / "model.safetensors").unlink()
    _malicious_weights(saved_tiny / "pytorch_model.bin", tmp_path / "ran")
    result = rlhf("sft", f"model.path={saved_tiny}", "data.eval=null", *QUICK)
    assert "the weights hold pickled objects beyond tensors" in _one_error_line(result)
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_holding_a_malicious_pickle_is_not_run(rlhf, tmp_path):
    assert rlhf("sft", "data.eval=null", *QUICK, "train.save_every=1", "output_dir=first").exit_code == 0
    checkpoint = tmp_path / "first/checkpoints/step-1"
    for name in ("rng.pt", "engine.pt"):
        _malicious_weights(checkpoint / name, tmp_path / f"ran-{name}")
    result = rlhf("sft", "data.eval=null", *QUICK, f"resume={checkpoint}", "output_dir=second")
    _one_error_line(result)
    assert not list(tmp_path.glob("ran-*"))


def test_a_model_with_its_own_code_is_refused_without_trust_remote_code(rlhf, tmp_path, saved_tiny):
    config = json.loads((saved_tiny / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (saved_tiny / "config.json").write_text(json.dumps(config))
    (saved_tiny / "custom.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    result = rlhf("sft", f"model.path={saved_tiny}", "data.eval=null", *QUICK)
    assert "needs model.trust_remote_code=true to load its own code" in _one_error_line(result)
    assert not (tmp_path / "ran").exists()


class _Server:
    """An http reward endpoint on localhost that answers each request with `reply()` after `delay_s`."""

    def __init__(self, reply, delay_s: float = 0.0):
        outer = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                time.sleep(delay_s)
                payload = json.dumps(reply(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def handle(self):
                try:
                    super().handle()
                except BrokenPipeError:
                    pass  # the client gave up waiting: what the timeout test wants

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_http_reward_that_does_not_answer_gives_up_after_its_timeout():
    from rlhf_cli.data.formats import PromptExample
    from rlhf_cli.errors import UserError
    from rlhf_cli.rewards import Reward, http_reward, score

    example = PromptExample("p.jsonl:1", "1+1=", "2", {})
    with _Server(lambda body: {"rewards": [1.0]}, delay_s=5.0) as server:
        reward = Reward("http", 1.0, http_reward(server.url, timeout=0.3, retries=1))
        started = time.monotonic()
        with pytest.raises(UserError, match=r"reward 'http' failed: .* did not answer within 0.3 s \(2 tries"):
            score([reward], ["1+1="], ["2"], [example])
        waited = time.monotonic() - started
        assert len(server.requests) == 2
    assert waited < 2 * 0.3 + 0.2 + 1.0  # two timeouts and one back-off, not the server's 5 s


SECRET = "sentinel-7f3a9c1e5b"


def test_credentials_in_urls_are_redacted():
    from rlhf_cli.runs import redact

    override = f"grpo.rewards=[{{name:http,url:'https://user:{SECRET}@host/score?n=1&access_token={SECRET}'}}]"
    assert redact([override]) == ["grpo.rewards=[{name:http,url:'https://<redacted>@host/score?n=1&access_token=<redacted>'}]"]
    assert redact({"url": f"https://{SECRET}@host", "api_key": SECRET, "steps": 3}) == {
        "url": "https://<redacted>@host", "api_key": "<redacted>", "steps": 3}


def test_no_secret_reaches_any_file_a_run_writes(rlhf, tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, SECRET)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)])
    with _Server(lambda body: {"rewards": [0.5] * len(body["completions"])}) as server:
        url = f"{server.url}?api_key={SECRET}"
        result = rlhf("grpo", "model.path=tiny", f"data.train={prompts}", *QUICK, "grpo.num_generations=2",
                      "rollout.max_new_tokens=4", f"grpo.rewards=[{{name:http,url:'{url}'}}]",
                      "logger=[jsonl,wandb,tensorboard]", "output_dir=runs/default/grpo")
        assert result.exit_code == 0, result.output
        assert server.requests, "the reward endpoint was called"
    assert rlhf("report", "runs/default", "--samples", "0").exit_code == 0
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path != prompts]
    assert any(path.name == "manifest.json" for path in written) and any("wandb" in path.parts for path in written)
    assert [path for path in written if SECRET.encode() in path.read_bytes()] == []
    assert SECRET not in result.output
