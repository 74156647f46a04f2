"""Generative tasks: answer scoring on hand cases, GSM8K numbers, prompts and their shots, the errors a user
meets, and the matched-compute analysis on a hand-made results dict."""

import pytest

from gateskip.errors import GateSkipError
from gateskip.eval import gentasks as g
from gateskip.eval.chat_fidelity import Setting
from gateskip.models import tiny_model, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant: {% endif %}")


def items(k: int, passage: str = "") -> list[g.Item]:
    return [g.Item(f"question {i}?", (f"answer {i}",), passage=f"{passage} {i}" if passage else "")
            for i in range(k)]


def test_normalisation_f1_and_exact_match():
    assert g.normalize("The  Eiffel Tower!") == "eiffel tower"
    assert g.f1("Saint Bernadette", ["Saint Bernadette"]) == 1.0
    assert g.exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0  # articles and punctuation ignored
    assert g.f1("an apple, a pear", ["apple pear"]) == 1.0
    assert g.f1("", ["Paris"]) == 0.0 and g.exact_match("", ["Paris"]) == 0.0
    assert g.f1("a", ["Paris"]) == 0.0  # normalises to nothing
    assert g.f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert g.f1("Paris France", ["London", "France"]) == pytest.approx(2 / 3)  # best over the golds
    assert g.exact_match("December 1972", ["14 December 1972 UTC", "December 1972"]) == 1.0
    assert g.f1("no overlap", ["Paris"]) == 0.0


def test_gsm8k_numbers():
    assert g.extract_number("48 / 2 = 24 so #### 1,024") == "1024"
    assert g.extract_number("5 + 4 = 9. So the answer is 9.") == "9"
    assert g.extract_number("The answer is $18. Then 3 more") == "18"
    assert g.extract_number("she has 3 apples and 12.5 pears") == "12.5"
    assert g.extract_number("no number here") is None
    assert g.number_match("So the answer is 18.", "18") == 1.0
    assert g.number_match("So the answer is 18.0", "18") == 1.0
    assert g.number_match("So the answer is 17.", "18") == 0.0
    assert g.number_match("", "18") == 0.0
    task = g.TASKS["gsm8k"]
    assert g.score(task, "9 + 9 = 18. So the answer is 18.", g.Item("q", ("18",))) == (1.0, 1.0)


def test_answers_are_cut():
    assert g.cut(" Paris\nQuestion: next", "fewshot") == "Paris"
    assert g.cut("\nParis", "fewshot") == ""  # a few-shot answer ends at its first newline
    assert g.cut("The answer is:\n Paris ", "chat") == "The answer is: Paris"  # chat: all of it


def test_shots_come_after_the_scored_items():
    late = g.Item("late?", ("a",), passage="story 3")  # a scored item's passage: neither a shot nor scored
    pool = items(40, passage="story") + [late]
    scored, shots = g.split_shots(pool, shots=3, pool=10)
    assert len(shots) == 3 and len(scored) == 30
    keys = {it.key for it in scored}
    assert all(s.key not in keys and pool.index(s) >= 30 for s in shots)
    assert late not in shots and late not in scored
    task = g.TASKS["squad"]
    text = g.fewshot_text(task, scored[0], shots)
    assert text.startswith(task.header) and text.endswith("Question: question 0?\nAnswer:")
    assert text.count("\nAnswer:") == 4 and "answer 0" not in text
    for s in shots:
        assert f"Question: {s.question}\nAnswer: {s.golds[0]}" in text
    with pytest.raises(GateSkipError, match="its own shots"):
        g.fewshot_text(task, shots[0], shots)
    request = g.chat_request(g.TASKS["nq"], g.Item("who wrote it", ("x",)))
    assert request.endswith("Question: Who wrote it?") and "Passage" not in request


def test_real_sets_split_cleanly():
    pytest.importorskip("pyarrow")
    for name in ("squad", "nq"):
        scored, shots = g.load_items(name, None)
        assert len(scored) > 500 and len(shots) == g.SHOTS
        assert not {s.key for s in shots} & {it.key for it in scored}
        assert g.load_items(name, 5)[0] == scored[:5]


def test_over_long_prompt_and_unknown_task_errors():
    tok = tiny_tokenizer()
    net = tiny_model("llama")  # context 256
    long = [g.Item("q " * 200, ("a",))]
    with pytest.raises(GateSkipError, match=r"nq:fewshot item 0 has a \d+-token prompt.*context of 256") as e:
        g.prompts(tok, g.TASKS["nq"], "fewshot", long, [], net.config.max_position_embeddings)
    assert "\n" not in str(e.value)
    with pytest.raises(GateSkipError, match=r"context of 256"):
        g.run(net, tok, [Setting("dense", 0.0)], [("nq", "fewshot")], 1, items={"nq": (long, [])})
    with pytest.raises(GateSkipError, match="unknown gen task 'trivia'.*squad, nq, coqa, gsm8k"):
        g.parse_specs("squad,trivia")
    with pytest.raises(GateSkipError, match="unknown gen task 'squad:cot'"):
        g.parse_specs(["squad:cot"])
    want = [("squad", "fewshot"), ("squad", "chat"), ("nq", "chat")]
    assert g.parse_specs("squad,nq:chat,squad:chat") == want
    assert len(g.parse_specs(None)) == 2 * len(g.TASKS)
    from gateskip.commands.eval import evaluate

    with pytest.raises(GateSkipError, match="unknown gen task"):
        evaluate(suite="gen", tasks=["hellaswag"], gates=None)
    with pytest.raises(GateSkipError, match="pass --gates DIR"):
        evaluate(suite="gen", tasks=["nq"], gates=None)


def test_qualification_rule():
    assert g.qualify([0.0] * 10)[2] is False
    mean, se, ok = g.qualify([1.0, 0.0] * 50)
    assert mean == 0.5 and se == pytest.approx(0.05025, abs=1e-4) and ok
    assert g.qualify([1.0] + [0.0] * 19)[2] is False  # 0.05 with SE 0.05: one SE above 0


def _row(method, saved, scores, budget=0.0):
    return {"method": method, "budget": budget, "compute_saved": saved, "tokens_skipped": saved,
            "seconds": 1.0, "new_tokens": 4, "score": sum(scores) / len(scores), "em": 0.0,
            "per_prompt": {"score": scores},
            "answers": ["x"] * len(scores)}


def _task(rows, dense, qualifies=True):
    return {"task": "t", "format": "fewshot", "metric": "f1", "items": len(rows[0]["per_prompt"]["score"]),
            "dense": dense, "se": 0.01, "qualifies": qualifies, "rows": rows, "questions": ["q", "q"],
            "golds": [["a"], ["a"]]}


def test_analysis_on_hand_made_results(tmp_path):
    a = _task([_row("dense", 0.0, [1.0, 1.0]), _row("gateskip", 0.0, [1.0, 1.0]),
               _row("gateskip", 0.4, [0.6, 0.2]), _row("random", 0.0, [1.0, 1.0]),
               _row("random", 0.4, [0.2, 0.2]),
               _row("oracle", 0.0, [1.0, 1.0]), _row("oracle", 0.4, [1.0, 0.6])], dense=1.0)
    b = _task([_row("dense", 0.0, [0.5, 0.5, 0.5, 0.5]), _row("gateskip", 0.1, [0.5] * 4),
               _row("gateskip", 0.3, [0.25] * 4), _row("random", 0.1, [0.5] * 4),
               _row("random", 0.3, [0.0] * 4), _row("oracle", 0.1, [0.5] * 4),
               _row("oracle", 0.3, [0.5] * 4)], dense=0.5)
    skipped = _task([_row("dense", 0.0, [0.0, 0.0])], dense=0.0, qualifies=False)
    res = {"limit": 4, "settings": [], "tasks": {"a:fewshot": a, "b:chat": b, "c:chat": skipped}}
    out = g.analyse(res)
    assert out["tasks"] == ["a:fewshot", "b:chat"]
    lvl = out["levels"]["0.20"]["methods"]  # a: halfway between its rows; b: halfway too
    assert lvl["gateskip"]["per_task"] == pytest.approx({"a:fewshot": 0.7, "b:chat": 0.75})
    assert lvl["gateskip"]["mean"] == pytest.approx(0.725)
    assert lvl["gateskip"]["worst"] == ["a:fewshot", pytest.approx(0.7)]
    assert lvl["random"]["mean"] == pytest.approx((0.6 + 0.5) / 2)
    assert lvl["oracle"]["mean"] == pytest.approx((0.9 + 1.0) / 2)
    vs = out["levels"]["0.20"]["versus"]
    assert vs["random"][0] == pytest.approx(0.725 - 0.55)  # the paired mean is the difference of task means
    assert vs["oracle"][0] == pytest.approx(0.725 - 0.95)
    assert vs["random"][1] <= vs["random"][0] <= vs["random"][2]
    assert vs["gap_closed"] == pytest.approx((0.725 - 0.55) / (0.95 - 0.55))
    top = out["levels"]["0.30"]["methods"]["gateskip"]["per_task"]["b:chat"]
    assert top == pytest.approx(0.5)  # b's last row, not extrapolated
    assert out["levels"]["0.10"]["methods"]["gateskip"]["mean"] == pytest.approx((0.85 + 1.0) / 2)
    res["analysis"] = out
    text = g.report(res)
    assert "| 20% | gateskip | 72.5% | a:fewshot 70.0% |" in text
    path = g.write(res, tmp_path)
    assert path.read_text() == text and (tmp_path / "gen.png").stat().st_size > 0
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def _tiny_sweep(monkeypatch, max_new_tokens: int):
    """A gated tiny model with a chat template, every task qualifying, an ``nq`` task answered in at most
    ``max_new_tokens``, and the dense and random settings."""
    import gateskip

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    net = tiny_model("llama")
    gateskip.add_gates(net, gateskip.GateSkipConfig())
    monkeypatch.setattr(g, "qualify", lambda s: (0.5, 0.1, True))
    monkeypatch.setitem(g.TASKS, "nq", g.Task("nq", "f1", max_new_tokens, "", "Answer briefly."))
    return net, tok, [Setting("dense", 0.0), Setting("random", 0.5, {"ratio": 0.5, "policy": "random", "seed": 0})]


def test_tiny_run_sweeps_qualifying_tasks(monkeypatch):
    """End to end on a tiny model: dense on both formats, then the other rows where dense qualifies."""
    net, tok, settings = _tiny_sweep(monkeypatch, max_new_tokens=4)
    data = {"nq": (items(5), items(13)[10:])}
    res = g.run(net, tok, settings, [("nq", "fewshot"), ("nq", "chat")], 5, batch=2, items=data)
    for key in ("nq:fewshot", "nq:chat"):
        rows = res["tasks"][key]["rows"]
        assert [r["method"] for r in rows] == ["dense", "random"]
        assert rows[1]["compute_saved"] > 0.1 and len(rows[1]["per_prompt"]["score"]) == 5
        assert all(0.0 <= x <= 1.0 for x in rows[0]["per_prompt"]["score"])
    assert "levels" in res["analysis"]


def test_resume_keeps_measured_rows_and_merge_adds_tasks(monkeypatch, tmp_path):
    """An interrupted run's rows are kept (not measured again) when the fingerprint matches, re-measured when it
    does not or the file is corrupt; merge adds another run's tasks and refuses other settings or the same task."""
    net, tok, settings = _tiny_sweep(monkeypatch, max_new_tokens=3)
    data = {"nq": (items(4), items(13)[10:])}
    path = tmp_path / "partial.json"
    first = g.run(net, tok, settings, [("nq", "fewshot")], 4, batch=2, items=data, resume=(path, {"gates": "a"}))
    assert first["resumed"] == 0 and path.is_file()
    calls = []
    real = g._answer
    monkeypatch.setattr(g, "_answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = g.run(net, tok, settings, [("nq", "fewshot")], 4, batch=2, items=data, resume=(path, {"gates": "a"}))
    assert again["resumed"] == 2 and not calls
    assert again["tasks"]["nq:fewshot"]["rows"] == first["tasks"]["nq:fewshot"]["rows"]
    g.run(net, tok, settings, [("nq", "fewshot")], 4, batch=2, items=data, resume=(path, {"gates": "b"}))
    assert len(calls) == 2  # another fingerprint: measured again
    path.write_text("{not json")
    g.run(net, tok, settings, [("nq", "fewshot")], 4, batch=2, items=data, resume=(path, {"gates": "b"}))
    assert len(calls) == 4  # a corrupt file: measured again
    other = g.run(net, tok, settings, [("nq", "chat")], 4, batch=2, items=data)
    merged = g.merge(first, [("b.json", other)])
    assert set(merged["tasks"]) == {"nq:fewshot", "nq:chat"}
    import copy

    assert g.merge(copy.deepcopy(merged), [("b.json", other)])["tasks"] == merged["tasks"]  # nothing new to add
    # the same task from two runs (the same dense answers): their rows are paired as one run's
    rows = first["tasks"]["nq:fewshot"]["rows"]
    part_a, part_b = copy.deepcopy(first), copy.deepcopy(first)
    part_a["tasks"]["nq:fewshot"]["rows"] = rows[:2]
    part_b["tasks"]["nq:fewshot"]["rows"] = [rows[0]] + rows[2:]
    whole = g.merge(part_a, [("b.json", part_b)])
    assert whole["tasks"]["nq:fewshot"]["rows"] == rows and whole["analysis"] == g.analyse(first)
    changed = copy.deepcopy(other)
    changed["tasks"]["nq:chat"]["rows"][0]["per_prompt"]["score"][0] += 1.0
    with pytest.raises(GateSkipError, match="also holds nq:chat, with other dense answers"):
        g.merge(merged, [("b.json", changed)])
    with pytest.raises(GateSkipError, match="another --limit"):
        g.merge(first, [("c.json", {**other, "limit": 9})])
    # a rerun with fewer settings keeps the rows it shares with the partial file, measured with the same setting
    calls.clear()
    g.run(net, tok, settings, [("nq", "fewshot")], 4, batch=2, items=data, resume=(path, {"gates": "c"}))
    dense_only = g.run(net, tok, settings[:1], [("nq", "fewshot")], 4, batch=2, items=data,
                       resume=(path, {"gates": "c"}))
    assert dense_only["resumed"] == 1 and len(calls) == 2


def test_a_row_within_half_a_point_counts_as_at_the_level():
    from gateskip.eval.chat_fidelity import matched

    rows = [_row("dense", 0.0, [1.0]), _row("gateskip", 0.148, [0.5]), _row("gateskip", 0.251, [0.3])]
    assert matched(rows, "gateskip", 0.20, "score") == pytest.approx([0.5 - 0.2 * 0.052 / 0.103])
    assert matched(rows, "gateskip", 0.145, "score") == [0.5]  # 0.3 points above its lowest row: taken there
    assert matched(rows, "gateskip", 0.255, "score") == [0.3]
    assert matched(rows, "gateskip", 0.14, "score") is None  # 0.8 points away: not extrapolated
