import pytest
import torch

from gateskip.models import tiny_model, tiny_tokenizer

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"]
VOCAB = 128
TEXT = ("the cat sat on the mat. the dog sat on the log. a bird sang in the tree. "
        "the sun rose over the hill and the day began. ")


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory, monkeypatch):
    """Measured execution tables (execution.py) and self-distillation answers (chat.py) go to fresh folders, one per
    test: neither a developer's own nor another test's table steers a test, and tests leave nothing in the user's
    cache."""
    monkeypatch.setenv("GATESKIP_EXECUTION_CACHE", str(tmp_path_factory.mktemp("execution")))
    monkeypatch.setenv("GATESKIP_CHAT_CACHE", str(tmp_path_factory.mktemp("chat")))


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    torch.manual_seed(0)
    # Tiny models are latency-bound: one thread avoids thread hand-offs that cost 10x on a busy
    # 2-core machine. Tests of the real model (marked `real`) use both cores.
    torch.set_num_threads(2 if request.node.get_closest_marker("real") else 1)


def left_padded(lengths, vocab=VOCAB, seed=0):
    """A left-padded batch of random token sequences with the given lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, t - n:] = 1
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture
def make_tiny():
    return tiny_model


def tiny_folder(tmp_path):
    """A tiny Llama and its tokenizer saved as a model folder, and a text file to train on."""
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(TEXT * 2 + f"paragraph {i}." for i in range(400)))
    return d, data


def generate_then_recompute(m, ids, mask, new_tokens, forward, **plan):
    """Greedy cached generation under ``gateskip.skipping(m, **plan)``, then the same sequences recomputed
    in one uncached ``forward(m, seq, full_mask)`` call under the same plan: (generate output, recomputed
    logits, prompt length). Asserts that something was skipped."""
    import gateskip
    from gateskip.core import gate_state

    with torch.no_grad(), gateskip.skipping(m, **plan):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert gate_state(m).counts[:, 0].sum() > 0
        seq = out.sequences
        full = torch.cat([mask, torch.ones(len(ids), seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        recomputed = forward(m, seq, full)
    return out, recomputed, ids.shape[1]


def path_grads(m, ids, grab, ratio=0.4, paths=("masked", "physical")):
    """Per skipping path, ``grab(m)`` after a backward pass of the LM loss on ``ids`` at ``ratio``."""
    import gateskip

    grads = {}
    for path in paths:
        m.zero_grad()
        with gateskip.skipping(m, ratio=ratio, path=path):
            m(input_ids=ids, labels=ids).loss.backward()
        grads[path] = grab(m)
    return grads
