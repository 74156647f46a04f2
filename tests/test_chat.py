"""Chat generation: fidelity metrics on hand cases, the never-skip rules on every path, batched greedy answers
against ``generate``, and the errors a user meets."""

import pytest
import torch

import gateskip
from gateskip.args import SkipArgs
from gateskip.chat import greedy_answers
from gateskip.core import gate_state
from gateskip.errors import GateSkipError
from gateskip.eval.chat_fidelity import is_empty, lcs_f1, matched, paired
from gateskip.models import tiny_model, tiny_tokenizer
from gateskip.state import GateState

TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant: {% endif %}")


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_lcs_f1_hand_cases():
    assert lcs_f1([5, 6, 7], [5, 6, 7]) == 1.0
    assert lcs_f1([], []) == 1.0
    assert lcs_f1([], [4]) == 0.0 and lcs_f1([4], []) == 0.0
    assert lcs_f1([1, 2, 3], [1, 3]) == pytest.approx(0.8)  # LCS 2: precision 2/3, recall 1
    assert lcs_f1([1, 2], [3, 4]) == 0.0


def test_empty_answers_count_as_empty():
    tok = tiny_tokenizer()
    assert is_empty(tok, [])
    assert is_empty(tok, tok(" \n ", add_special_tokens=False)["input_ids"])
    assert is_empty(tok, [tok.eos_token_id, tok.pad_token_id])
    assert not is_empty(tok, tok("a", add_special_tokens=False)["input_ids"])


def test_matched_interpolates_between_rows_and_never_extrapolates():
    rows = [{"method": "g", "compute_saved": 0.1, "per_prompt": {"overlap": [1.0, 0.0]}},
            {"method": "g", "compute_saved": 0.3, "per_prompt": {"overlap": [0.0, 1.0]}}]
    assert matched(rows, "g", 0.15, "overlap") == pytest.approx([0.75, 0.25])
    assert matched(rows, "g", 0.35, "overlap") is None
    d, lo, hi = paired([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert d == 1.0 and lo == hi == 1.0


class Recorder(GateState):
    """Records (input ids, skip mask) of every branch decision."""

    def on_gate(self, branch, x, g, imp=None):
        skip = super().on_gate(branch, x, g, imp)
        if skip is not None:
            self.seen.append((self.call.ids, self.call.prefill, skip.clone()))
        return skip


def recorded_model(cfg):
    m = tiny_model("llama")
    gateskip.add_gates(m, cfg, state_cls=Recorder)
    gate_state(m).seen = []
    return m


@pytest.mark.parametrize("path", ["masked", "physical"])
def test_never_skip_tokens_and_last_prompt_position(path):
    protected = 7
    m = recorded_model(gateskip.GateSkipConfig(protect_tokens=(protected,), protect_last=True))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 128, (3, 12), generator=g)
    ids[:, ::3] = protected
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad(), gateskip.skipping(m, ratio=0.9, policy="random", path=path):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    seen = gate_state(m).seen
    assert any(not prefill for _, prefill, _ in seen), "decode steps decided too"
    skipped_any = False
    for call_ids, prefill, skip in seen:
        skip = skip.reshape(call_ids.shape)
        assert not skip[call_ids == protected].any(), "a protected token was skipped"
        if prefill:
            assert not skip[:, -1].any(), "the last prompt position was skipped"
        skipped_any |= bool(skip.any())
    assert skipped_any
    if path == "physical":  # the same decisions on the masked path give the same text
        gate_state(m).seen = []
        with torch.no_grad(), gateskip.skipping(m, ratio=0.9, policy="random", path="masked"):
            ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_never_skip_token_in_one_token_decode():
    """Decode at batch 1 under thresholds takes the one-token shortcut: a protected token must leave it."""
    protected = 9
    m = recorded_model(gateskip.GateSkipConfig(protect_tokens=(protected,)))
    batches = [torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    gateskip.calibrate(m, batches, ratio=0.9)
    prompt = torch.tensor([[5, 6, 7, 8]])
    from transformers import DynamicCache

    from gateskip.compat import model_cache_arg

    cache = {model_cache_arg(m): DynamicCache()}
    with torch.no_grad(), gateskip.skipping(m, ratio=0.9, policy="threshold"):
        m(input_ids=prompt, use_cache=True, **cache)
        gate_state(m).seen = []
        m(input_ids=torch.tensor([[protected]]), use_cache=True, **cache)
        assert all(not s.any() for _, _, s in gate_state(m).seen)
        assert gate_state(m).counts[:, 0].sum() > 0  # the prompt did skip


def test_rules_are_saved_with_the_gates(tmp_path):
    m = tiny_model("llama")
    gateskip.add_gates(m, gateskip.GateSkipConfig(protect_tokens=(3, 2), protect_last=True))
    gateskip.save_gates(m, tmp_path / "g")
    m2 = tiny_model("llama")
    gateskip.load_gates(m2, tmp_path / "g")
    cfg = gate_state(m2).cfg
    assert cfg.protect_tokens == (2, 3) and cfg.protect_last is True
    with pytest.raises(GateSkipError, match="protect_tokens"):
        gateskip.GateSkipConfig(protect_tokens=(-1,))


def test_special_token_ids():
    assert set(gateskip.special_token_ids(tiny_tokenizer())) == {0, 1, 2, 3}


def test_ratio_zero_chat_generation_equals_the_model_without_gates():
    """Gates that leave the backbone unchanged (bias 30: every gate exactly 1) at ratio 0 write what the original
    model writes, token for token, in the chat format; ``greedy_answers`` (batched, left-padded, ended rows masked)
    writes what ``generate`` writes one prompt at a time."""
    from gateskip.args import SkipArgs
    from gateskip.chat import pad_id, stop_ids, template_ids
    from gateskip.commands.generate import complete

    tok = chat_tokenizer()
    plain = tiny_model("llama")
    gated = tiny_model("llama")
    gateskip.add_gates(gated, gateskip.GateSkipConfig(init_bias=30.0, init_std=0.0))
    for prompt in ("hi there", "what is the cat doing on the mat?"):
        text, _, _, _ = complete(gated, tok, prompt, ratio=0.0, skipping=SkipArgs(policy="quantile"), max_new_tokens=10)
        enc = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ref = plain.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert text == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    prompts = [template_ids(tok, p) for p in ("hi", "tell me about the dog and the log", "a bird?")]
    ans = greedy_answers(gated, prompts, 8, stop_ids(tok), pad_id(tok), batch=3)
    for p, a, stopped in zip(prompts, ans.tokens, ans.stopped):
        with torch.no_grad():
            ref = plain.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        if stopped:
            assert ref[-1] in stop_ids(tok)
            ref = ref[:-1]
        assert a == ref


def test_chat_errors_are_one_line():
    m = tiny_model("llama")
    with pytest.raises(GateSkipError, match="exceeds the model's context"):
        greedy_answers(m, [[5] * (m.config.max_position_embeddings - 2)], 8, [2], 0)
    from gateskip.commands.eval import evaluate

    with pytest.raises(GateSkipError, match="unknown suite"):
        evaluate(suite="nosuch", gates=None)
    from gateskip.commands.eval_chat import settings

    with pytest.raises(GateSkipError, match="unknown chat method"):
        settings("0.5", None, None, ["gateskip", "best"], "threshold", SkipArgs(modules=("mlp",)))


def test_chat_requests_are_split():
    pytest.importorskip("pyarrow")
    from gateskip.chat import chat_requests

    held, train = chat_requests("heldout", 200), chat_requests("train", 500)
    assert len(set(held)) == 200 and not set(held) & set(train)


def test_chat_fidelity_run_writes_a_report(tmp_path):
    """End to end on a tiny model: the dense row measured against itself scores overlap 1, NLL x1 and no skipping;
    every method's row is in the report, with the sample answers."""
    pytest.importorskip("pyarrow")
    from gateskip.commands.eval_chat import settings
    from gateskip.eval.chat_fidelity import run, write

    tok = chat_tokenizer()
    m = tiny_model("llama")
    m.config.max_position_embeddings = 2048  # character-level prompts of the chat template are long
    gateskip.add_gates(m, gateskip.GateSkipConfig(protect_last=True))
    rows = settings("0.5", "0.5", "0.5", ["gateskip", "random", "oracle"], "quantile", SkipArgs(recheck_stops=False))
    res = run(m, tok, rows, n=4, max_new_tokens=4, batch=2)
    dense = res["rows"][0]
    assert dense["summary"]["overlap"] == 1.0 and dense["summary"]["nll_ratio"] == pytest.approx(1.0)
    assert dense["compute_saved"] == 0.0
    assert all(r["compute_saved"] > 0 for r in res["rows"][1:])
    text = write(res, tmp_path).read_text()
    for method in ("dense", "gateskip", "random", "oracle"):
        assert f"| {method} |" in text
    assert (tmp_path / "chat.json").is_file()


def test_chat_source_is_written_once_and_packed(tmp_path, monkeypatch):
    """``--data mix,chat``: the chat part becomes a .jsonl of the model's own answers in its template, written once
    (a second call reuses the file) and readable as training text."""
    pytest.importorskip("pyarrow")
    import json
    import os

    from gateskip.chat import resolve_chat_source
    from gateskip.data import load_texts

    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path / "models"))
    tok = chat_tokenizer()
    m = tiny_model("llama")
    m.config.max_position_embeddings = 2048
    data = resolve_chat_source("shakespeare,chat", m, tok, "tiny/llama", n=4)
    first, path = data.split(",")
    assert first == "shakespeare" and path.endswith(".jsonl")
    stamp = os.path.getmtime(path)
    assert resolve_chat_source("chat", m, tok, "tiny/llama", n=4) == path
    assert os.path.getmtime(path) == stamp
    rows = [json.loads(line)["text"] for line in open(path)]
    assert len(rows) == 4 and all(r.startswith("<bos>user: ") and "<bos>assistant: " in r for r in rows)
    assert set(load_texts(path, split="train")) <= set(rows)


def test_every_skipping_option_reaches_the_rows_and_the_core_suite_refuses_generation_options():
    """``--suite chat`` / ``gen`` rows run with every option of the skip group set away from its default (they were
    once dropped: --allocation, --protect-tail); the core suite, which scores given answers, names the ones it cannot
    use instead of ignoring them."""
    from gateskip.commands.eval import evaluate
    from gateskip.commands.eval_chat import settings

    sk = SkipArgs(allocation="global", protect_tail=8, execution="measured", protect_last=False, recheck_below=0.2)
    rows = settings("0.5", None, None, ["gateskip", "random"], "threshold", sk)
    for r in rows[1:]:
        assert {"allocation": "global", "protect_tail": 8, "execution": "measured", "protect_last": False,
                "recheck_below": 0.2, "ratio": 0.5}.items() <= r.skip.items()
    with pytest.raises(GateSkipError, match="--saved steers one ratio"):
        settings("0.5", None, None, ["gateskip"], "threshold", sk, saved=[0.2])
    boosted = settings("0.5", None, None, ["gateskip"], "threshold", SkipArgs(protect_tail=8), saved=[0.2])[1].skip
    assert boosted["prompt_boost"] == SkipArgs().prompt_boost and boosted["saved"] == 0.2
    plain = settings("0.5", None, None, ["gateskip"], "threshold", SkipArgs())[1].skip
    assert set(plain) == {"modules", "kv", "ratio", "policy"}  # defaults stay out: the resume keys do not move
    with pytest.raises(GateSkipError, match="--protect-tail acts on generation"):
        evaluate(suite="core", gates=None, protect_tail=4)


def test_answer_markers_from_the_template_and_training_scores_answers_only(tmp_path):
    """``loss_on="answers"``: the header is the template's generation prompt; the distillation loss of a batch is the
    KL at the answer positions only, a batch without an answer gives no task gradient, and a tokenizer without a
    template or a call without markers is refused in one line."""
    from gateskip.chat import answer_markers
    from gateskip.data import pack
    from gateskip.losses import answer_positions
    from gateskip.train import fit

    tok = chat_tokenizer()
    header, ends = answer_markers(tok)
    assert tok.decode(header) == "<bos>assistant: " and tok.eos_token_id in ends
    with pytest.raises(GateSkipError, match="no chat template"):
        answer_markers(tiny_tokenizer())
    texts = [tok.apply_chat_template([{"role": "user", "content": f"question {i}?"}], tokenize=False,
                                     add_generation_prompt=True) + f"answer number {i} is here" for i in range(40)]
    stream = pack(tok, texts, seq_len=96, batch_size=2, seed=0)
    ids = next(pack(tok, texts, seq_len=96, batch_size=2, seed=0))
    pos = answer_positions(ids, header, ends)
    assert 0 < int(pos.sum()) < pos.numel()
    m = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=2.0))
    with pytest.raises(GateSkipError, match="answer markers"):
        fit(m, stream, steps=1, loss_on="answers")
    plain = pack(tok, ["plain text without any turn. " * 8] * 8, seq_len=96, batch_size=2, seed=0)
    import json

    def tasks(data, out, objective):
        fit(m, data, steps=2, lr=1e-2, loss_on="answers", answer_markers=(header, ends), max_ratio=0.3, warmup=1,
            objective=objective, out=tmp_path / out)
        return [json.loads(r)["task"] for r in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]

    for objective in ("distill", "ce"):
        assert tasks(plain, "plain" + objective, objective) == [0.0, 0.0]  # nothing scored, no task gradient
    ce = tasks(stream, "chat", "ce")
    assert all(t > 0 for t in ce)
    mask = torch.cat([torch.zeros_like(pos[:, :1]), pos[:, :-1]], 1)  # the scored positions' next tokens
    from gateskip.losses import next_token_ce

    m2 = gateskip.add_gates(tiny_model("llama"), gateskip.GateSkipConfig(init_bias=2.0))
    with torch.no_grad(), gateskip.skipping(m2, ratio=0.0):
        logits = m2(input_ids=ids, use_cache=False).logits
    fit(m2, pack(tok, texts, seq_len=96, batch_size=2, seed=0), steps=1, lr=0.0, loss_on="answers",
        answer_markers=(header, ends), objective="ce", warmup=1, out=tmp_path / "one")
    first = json.loads((tmp_path / "one" / "train_log.jsonl").read_text().splitlines()[0])["task"]
    assert first == pytest.approx(float(next_token_ce(logits, ids, mask)), abs=1e-4)  # step 1 skips nothing


def test_compare_with_adds_another_runs_rows_paired_and_refuses_other_requests():
    """``--suite chat --compare-with``: another run's rows on the same requests are added, named by its gates, and
    the report pairs this run's gateskip rows with them; other requests or other dense answers are refused."""
    from gateskip.eval.chat_fidelity import merge, report

    def row(method, saved, overlap, answers=("a", "b")):
        per = {"empty": [0.0, 0.0], "early": [0.0, 0.0], "empty_or_early": [0.0, 0.0], "overlap": list(overlap),
               "nll": [1.0, 1.2], "first_agree": [1.0, 1.0]}
        return {"method": method, "budget": saved, "compute_saved": saved, "tokens_skipped": saved, "seconds": 1.0,
                "new_tokens": 2, "summary": {"empty": 0.0, "early": 0.0, "empty_or_early": 0.0,
                                             "overlap": sum(overlap) / 2, "nll": 1.1, "nll_ratio": 1.1,
                                             "length_ratio": 1.0, "first_agree": 1.0},
                "per_prompt": per, "answers": list(answers)}

    def run(overlap):
        return {"prompts": 2, "max_new_tokens": 8, "requests": ["q1", "q2"],
                "rows": [row("dense", 0.0, (1.0, 1.0)), row("gateskip", 0.15, overlap), row("gateskip", 0.25, overlap)]}

    merged = merge(run((0.6, 0.4)), [run((0.5, 0.3))], ["other"])
    assert [r["method"] for r in merged["rows"]] == ["dense", "gateskip", "gateskip", "gateskip (other)",
                                                     "gateskip (other)"]
    text = report(merged)
    assert "| 15% | gateskip (other) | +0.000 [+0.000, +0.000] | +0.100 [+0.100, +0.100] |" in text
    off = run((0.5, 0.3))  # one --saved row each, landing off the level: paired at the budget both asked for
    mine = run((0.6, 0.4))
    off["rows"], mine["rows"] = off["rows"][:2], mine["rows"][:2]
    off["rows"][1]["compute_saved"], mine["rows"][1]["compute_saved"] = 0.141, 0.138
    text = report(merge(mine, [off], ["other"]))
    assert "| budget 0.15 (13.8% / 14.1% saved) | gateskip (other) | +0.000 [+0.000, +0.000] | +0.100 [+0.100, +0.100] |" in text
    assert "| 15% | gateskip (other) |" not in text
    with pytest.raises(GateSkipError, match="another set of requests"):
        merge(run((0.6, 0.4)), [{**run((0.5, 0.3)), "requests": ["q1", "q3"]}], ["other"])
    other = run((0.5, 0.3))
    other["rows"][0] = row("dense", 0.0, (1.0, 1.0), answers=("x", "y"))
    with pytest.raises(GateSkipError, match="dense answers differ"):
        merge(run((0.6, 0.4)), [other], ["other"])
