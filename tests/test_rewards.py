"""The reward functions of the RL stages (rlhf_cli.rewards): each built-in, the http endpoint with
its timeout and retries, user functions by import path, and the errors a failing one gives."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.rewards import build_rewards, gsm8k_answer, score

GSM8K_ANSWER = "She sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def spec(name: str, **keys) -> SimpleNamespace:
    return SimpleNamespace(**{"name": name, "weight": 1.0, "pattern": None, "path": None, "url": None,
                              "timeout": 10.0, "retries": 2, **keys})


def example(answer, prompt: str = "Q: ?") -> SimpleNamespace:
    return SimpleNamespace(where="train.jsonl:3", prompt=prompt, answer=answer, row={})


def scores(reward_spec, completions, answer=GSM8K_ANSWER) -> list[float]:
    rewards = build_rewards([reward_spec])
    totals, _ = score(rewards, ["p"] * len(completions), completions, [example(answer)] * len(completions))
    return totals


def test_gsm8k_final_answer_is_the_text_after_the_marks():
    assert gsm8k_answer(GSM8K_ANSWER) == "72"
    assert gsm8k_answer("so the total is\n#### 1,234") == "1234"
    assert gsm8k_answer("72") == "72"


@pytest.mark.parametrize("completion", ["72", "72.0", "$72", "\\boxed{72}", "The answer is 72.", "#### 72"])
def test_math_reward_accepts_every_way_of_writing_the_answer(completion):
    assert scores(spec("math"), [completion]) == [1.0]


@pytest.mark.parametrize("completion", ["71", "\\boxed{71}", "7.2", "", "seventy"])
def test_math_reward_rejects_wrong_answers(completion):
    assert scores(spec("math"), [completion]) == [0.0]


def test_math_reward_reads_thousands_separators_in_gsm8k_answers():
    assert scores(spec("math"), ["1234", "1,234", "1243"], answer="#### 1,234") == [1.0, 1.0, 0.0]


def test_exact_match_compares_stripped_text():
    assert scores(spec("exact_match"), [" 82\n", "82.0", "8"], answer="82") == [1.0, 0.0, 0.0]


def test_format_reward_matches_the_whole_completion():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    completions = ["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>", "<think>x</think><answer>3</answer> extra"]
    assert scores(spec("format", pattern=pattern), completions) == [1.0, 0.0, 0.0]


def test_weighted_rewards_sum_and_each_is_reported():
    rewards = build_rewards([spec("exact_match", weight=2.0), spec("format", pattern=r"\d+", weight=0.5)])
    totals, each = score(rewards, ["p", "p"], ["82", "x"], [example("82"), example("82")])
    assert totals == [2.5, 0.0]
    assert each == {"exact_match": [1.0, 0.0], "format": [1.0, 0.0]}


def test_a_rule_reward_without_an_answer_field_names_the_row():
    with pytest.raises(UserError, match=r"train.jsonl:3: reward 'exact_match' needs an `answer` field"):
        scores(spec("exact_match"), ["1"], answer=None)


@pytest.mark.parametrize(
    "reward_spec,message",
    [
        (spec("bleu"), "unknown reward 'bleu'"),
        (spec("format"), "the format reward needs a `pattern`"),
        (spec("format", pattern="(unclosed"), "is not a regular expression"),
        (spec("http"), "the http reward needs a `url`"),
        (spec("model"), "the model reward needs a `path`"),
        (spec("no_such_module_xyz:fn"), "cannot import reward function 'no_such_module_xyz:fn'"),
    ],
)
def test_misconfigured_rewards_are_user_errors(reward_spec, message):
    with pytest.raises(UserError, match=message):
        build_rewards([reward_spec])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, examples):\n    return [float(len(c)) for c in completions]\n"
        "def broken(prompts, completions, examples):\n    raise KeyError('score')\n"
        "def short(prompts, completions, examples):\n    return [1.0]\n"
        "def text(prompts, completions, examples):\n    return ['high' for _ in completions]\n"
        "def nan(prompts, completions, examples):\n    return [float('nan') for _ in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_user_function_by_import_path(user_module):
    assert scores(spec(f"{user_module}:length"), ["ab", "abcd"]) == [2.0, 4.0]


@pytest.mark.parametrize(
    "function,message",
    [
        ("broken", r"reward 'my_rewards:broken' failed: KeyError: 'score'"),
        ("short", r"reward 'my_rewards:short' returned 1 values for 2 completions"),
        ("text", r"reward 'my_rewards:text' returned 'high', not a finite number"),
        ("nan", r"reward 'my_rewards:nan' returned nan, not a finite number"),
    ],
)
def test_a_failing_user_function_is_named(user_module, function, message):
    with pytest.raises(UserError, match=message):
        scores(spec(f"{user_module}:{function}"), ["a", "b"])


def test_a_non_callable_import_path_is_refused(user_module):
    with pytest.raises(UserError, match="'my_rewards:NOT_CALLABLE' is not callable"):
        build_rewards([spec(f"{user_module}:NOT_CALLABLE")])


class _Endpoint:
    """A local scoring server: rewards are completion lengths; the first `slow_replies` requests
    sleep past the client's timeout."""

    def __init__(self, slow_replies: int = 0, delay: float = 1.0, reply: bytes | None = None):
        self.requests: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                if len(endpoint.requests) <= slow_replies:
                    time.sleep(delay)
                payload = reply if reply is not None else json.dumps({"rewards": [len(c) for c in body["completions"]]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    servers = []

    def start(**kwargs) -> _Endpoint:
        servers.append(_Endpoint(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_http_reward_posts_prompts_completions_and_answers(endpoint):
    server = endpoint()
    assert scores(spec("http", url=server.url), ["a", "abc"], answer="72") == [1.0, 3.0]
    assert server.requests == [{"prompts": ["p", "p"], "completions": ["a", "abc"], "answers": ["72", "72"]}]


def test_http_reward_retries_after_a_timeout(endpoint):
    server = endpoint(slow_replies=1, delay=1.0)
    assert scores(spec("http", url=server.url, timeout=0.3, retries=2), ["abcd"]) == [4.0]
    assert len(server.requests) == 2


def test_http_reward_that_keeps_timing_out_fails_clearly(endpoint):
    server = endpoint(slow_replies=10, delay=1.0)
    with pytest.raises(UserError, match=r"reward 'http' failed: .*did not answer within 0.2 s \(2 tries"):
        scores(spec("http", url=server.url, timeout=0.2, retries=1), ["a"])
    assert len(server.requests) == 2


def test_http_reward_with_a_malformed_reply_is_named(endpoint):
    server = endpoint(reply=b'{"scores": [1]}')
    with pytest.raises(UserError, match=r"reward 'http' failed: .*without a JSON list under 'rewards'"):
        scores(spec("http", url=server.url), ["a"])


def test_http_reward_with_nothing_listening_fails_after_its_retries():
    with pytest.raises(UserError, match=r"reward 'http' failed: .*did not answer within 0.5 s \(1 try"):
        scores(spec("http", url="http://127.0.0.1:9/score", timeout=0.5, retries=0), ["a"])


def test_model_reward_is_the_reward_models_score_of_prompt_and_completion(tmp_path):
    import torch

    from rlhf_cli.config.schema import ModelConfig
    from rlhf_cli.data.formats import Message
    from rlhf_cli.data.tokenize import render
    from rlhf_cli.models import load_reward_model, load_tokenizer

    model_cfg = ModelConfig(path="tiny")
    tokenizer = load_tokenizer(model_cfg)
    model = load_reward_model(model_cfg, tokenizer, seed=3)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    rewards = build_rewards([spec("model", path=str(tmp_path / "rm"))], model_cfg, "cpu")
    chat = (Message("user", "What is 2+2?"),)
    examples = [example(None, prompt="Q: 1+1="), example(None, prompt=chat), example(None, prompt="Q: 12*3=")]
    completions = ["2", "It is 4.", "36"]
    totals, each = score(rewards, ["unused"] * 3, completions, examples)

    # One sequence at a time, with no padding: what train-rm scored.
    texts = [
        tokenizer("Q: 1+1=")["input_ids"] + tokenizer("2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        render(tokenizer, chat + (Message("assistant", "It is 4."),)),
        tokenizer("Q: 12*3=")["input_ids"] + tokenizer("36", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
    ]
    with torch.no_grad():
        expected = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in texts]
    assert totals == pytest.approx(expected, abs=1e-5)
    assert each["model"] == totals
