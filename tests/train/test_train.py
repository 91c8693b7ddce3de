"""Training, indexer distillation and the recall eval, on CPU with tiny models and data."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from services.cli import main
from services.engine.checkpoint import load_checkpoint, save_checkpoint
from services.engine.config import ModelConfig
from services.engine.layers import masked_attention, sliding_window_attention
from services.engine.model import CLSAModel
from services.evals.passkey import INSTRUCTION, QUESTION, key_line
from services.evals.recall import run_recall
from services.train.data import Mixer, batch_rng, expand_paths, held_out_text, split_files, training_text
from services.train.distill import dense_attention_average, indexer_kl
from services.train.trainer import TrainConfig, train

TINY = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, swa_window=16,
                   index_dim=16, index_topk=32, max_seq_len=1024)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven", "glass"]
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + f"\nfile {i}\n")
    return root


# ---- the training forward path -------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, 16, 64])
@pytest.mark.parametrize("length", [1, 15, 16, 37])
def test_sliding_window_attention_equals_the_masked_reference(window: int, length: int) -> None:
    gen = torch.Generator().manual_seed(length * 100 + window)
    q = torch.randn(2, length, 4, 8, generator=gen)
    k, v = torch.randn(2, length, 2, 8, generator=gen), torch.randn(2, length, 2, 8, generator=gen)
    pos = torch.arange(length)
    mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
    want = masked_attention(q, k, v, mask.expand(2, -1, -1), 0.3)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, 0.3), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["yoco", "transformer"])
def test_forward_train_equals_the_whole_sequence_spec(arch: str) -> None:
    model = CLSAModel(ModelConfig(**{**TINY.to_dict(), "arch": arch}))
    model.init_weights(0)
    tokens = torch.randint(0, 259, (2, 53))
    torch.testing.assert_close(model.forward_train(tokens), model.forward_full(tokens, "dense"), atol=1e-5, rtol=1e-5)


def test_sparse_training_forward_is_clsa_and_trains_only_the_backbone() -> None:
    """The joint stage's LM loss through the indexer's top-k: the same logits as the CLSA spec,
    different from dense once the sequence is longer than k, and no gradient to the indexer."""
    model = _sharp_model()
    tokens = torch.randint(0, 259, (2, 53), generator=torch.Generator().manual_seed(1))
    sparse = model.forward_train(tokens, index_topk=8)
    torch.testing.assert_close(sparse, model.forward_full(tokens, "clsa", 8), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sparse[:, 20:], model.forward_full(tokens, "dense")[:, 20:], atol=1e-3)
    torch.testing.assert_close(sparse[:, :8], model.forward_train(tokens)[:, :8], atol=1e-5, rtol=1e-5)  # t+1 <= k
    sparse.sum().backward()  # type: ignore[union-attr]
    assert model.shared is not None and model.shared.wq_idx.weight.grad is None
    assert model.cross_decoder[0].wq.weight.grad is not None


# ---- data ----------------------------------------------------------------------------------


def test_held_out_files_never_reach_training(corpus: Path) -> None:
    files = expand_paths([str(corpus)])
    train_files, held = split_files(files)
    assert len(held) == 2 and not set(held) & set(train_files)
    train_text, held_text = training_text([str(corpus)], 1 << 20), held_out_text([str(corpus)], 1 << 20)
    assert b"file 19\n" in held_text and b"file 19\n" not in train_text
    with pytest.raises(ValueError, match="does not exist"):
        expand_paths([str(corpus / "missing")])


def test_samples_have_the_eval_formats_and_weighted_answers(corpus: Path) -> None:
    mixer = Mixer(training_text([str(corpus)], 1 << 20), 400, passkey_frac=0.5, kv_frac=0.5, answer_weight=5.0)
    rng = random.Random(3)
    passkey = mixer._passkey(rng)
    text = bytes(passkey.tokens).decode()
    key = int(text.rsplit(" ", 1)[1].rstrip("."))
    assert len(passkey.tokens) == 401 and text.startswith(INSTRUCTION) and key_line(key) in text
    assert text.endswith(QUESTION + f" {key}.")
    assert passkey.weights[-7:] == [5.0] * 7 and passkey.weights[-8] == 1.0  # " NNNNN." weighs 5
    kv = mixer._key_value(rng)
    text = bytes(kv.tokens).decode()
    asked = text.rsplit("What is the value of key ", 1)[1][:6]
    value = text.rsplit(" ", 1)[1].rstrip(".")
    assert f"The value of key {asked} is {value}.\n" in text and len(kv.tokens) == 401
    for seed in range(20):  # 1-4 questions per sample, every answer's bytes weighted, nothing else
        kv = mixer._key_value(random.Random(seed))
        text = bytes(kv.tokens).decode()
        questions = re.findall(r"What is the value of key (\w{6})\? The value of key \1 is (\d{5})\.", text)
        assert questions and all(f"The value of key {k} is {v}.\n" in text for k, v in questions)
        weighted = "".join(text[i + 1] for i, w in enumerate(kv.weights) if w == 5.0)
        assert weighted == "".join(f" {v}." for _, v in questions)
    assert mixer.sample(batch_rng(0, 5, 1)) == mixer.sample(batch_rng(0, 5, 1))  # a pure function of (seed, step)
    with pytest.raises(ValueError, match="at least twice"):
        Mixer(b"x" * 100, 400, 0.0, 0.0)
    with pytest.raises(ValueError, match="sum to <= 1"):
        Mixer(b"x" * 10_000, 400, 0.7, 0.7)


# ---- training ------------------------------------------------------------------------------


def _tiny_start(tmp_path: Path) -> str:
    model = CLSAModel(TINY)
    model.init_weights(0)
    save_checkpoint(model, tmp_path / "init")
    return str(tmp_path / "init")


def _config(tmp_path: Path, corpus: Path, out: str, steps: int, **kw: object) -> TrainConfig:
    base = dict(model=_tiny_start(tmp_path), out=str(tmp_path / out), steps=steps, tokens_per_step=512,
                schedule="256:0.5,320:0.5", warmup=2, ckpt_every=3, log_every=1, corpus=[str(corpus)], device="cpu")
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path: Path, corpus: Path) -> None:
    straight = train(_config(tmp_path, corpus, "straight", 6), progress=False)
    # the same run, stopped after 3 steps and started again: same batches, same optimizer state
    train(_config(tmp_path, corpus, "resumed", 6), progress=False, stop_at=3)
    resumed = train(_config(tmp_path, corpus, "resumed", 6), progress=False)
    assert load_checkpoint(resumed).fingerprint == load_checkpoint(straight).fingerprint
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6)) and [r["seq_len"] for r in log] == [256] * 3 + [320] * 3
    assert log[-1]["loss"] < log[0]["loss"]
    record = (straight / "TRAINING.md").read_text()
    assert "steps: 6 of 6" in record and str(corpus) in record
    with pytest.raises(ValueError, match="schedule"):
        train(_config(tmp_path, corpus, "resumed", 6, schedule="256:1.0"), progress=False)


def test_training_rejects_bad_settings(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(ValueError, match="LENGTH:SHARE"):
        TrainConfig(schedule="long")
    with pytest.raises(ValueError, match="max_seq_len"):
        train(_config(tmp_path, corpus, "long", 2, schedule="4096:1.0"), progress=False)


# ---- distillation and recall ---------------------------------------------------------------


def _sharp_model() -> CLSAModel:
    model = CLSAModel(TINY)
    model.init_weights(1)
    with torch.no_grad():  # larger query weights: peaked attention, something to distill
        for cross in model.cross_decoder:
            cross.wq.weight.mul_(30)
    return model


def test_dense_attention_average_is_a_distribution_over_earlier_positions() -> None:
    model = _sharp_model()
    with torch.no_grad():
        _, inputs = model.forward_train(torch.randint(0, 259, (2, 40)), collect=True)  # type: ignore[misc]
    target = dense_attention_average(inputs, model.sm_scale)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 40))
    assert float(torch.triu(target, diagonal=1).abs().max()) == 0.0
    rows = torch.tensor([5, 39])
    torch.testing.assert_close(dense_attention_average(inputs, model.sm_scale, rows), target[:, rows])


def test_indexer_distillation_moves_only_the_indexer_and_lowers_the_kl() -> None:
    model = _sharp_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, inputs = model.forward_train(tokens, collect=True)  # type: ignore[misc]
    assert model.shared is not None
    optimizer = torch.optim.AdamW([model.shared.wq_idx.weight, model.shared.wk_idx.weight], lr=1e-2)
    first = indexer_kl(model, inputs).item()
    for _ in range(40):
        loss = indexer_kl(model, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert indexer_kl(model, inputs).item() < 0.5 * first
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"shared.wq_idx.weight", "shared.wk_idx.weight"}


def test_recall_is_a_share_and_is_complete_when_k_covers_every_position() -> None:
    model = _sharp_model().eval()
    cells = run_recall(model, bytes(range(256)) * 4, [96], [4, 96], windows=2, queries=16)
    small, full = cells
    assert 0.0 <= small.recall <= 1.0 and small.random == pytest.approx(float((4 / torch.arange(81, 97)).mean()), 1e-5)
    assert full.recall == pytest.approx(1.0, abs=1e-5)


# ---- the command line ----------------------------------------------------------------------


def test_train_distill_and_recall_from_the_command_line(tmp_path: Path, corpus: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    common = ["--corpus", str(corpus), "--device", "cpu", "--quiet"]
    assert main(["train", "--model", "clsa-tiny", "--out", str(run), "--steps", "2", "--tokens-per-step", "512",
                 "--schedule", "256:1", "--warmup", "1", *common]) == 0
    assert main(["distill-indexer", "--model", str(run / "checkpoint"), "--out", str(tmp_path / "d"), "--steps", "2",
                 "--joint-steps", "1", "--batch-size", "1", "--seq-len", "256", "--save-dtype", "bfloat16",
                 *common]) == 0
    distilled = tmp_path / "d" / "checkpoint"
    assert "Indexer distillation" in (distilled / "TRAINING.md").read_text()
    out = tmp_path / "recall.json"
    assert main(["eval", "recall", "--model", str(distilled), "--lengths", "300", "--trials", "1", "--ks", "16,300",
                 "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert [c["k"] for c in cells] == [16, 300] and cells[1]["recall"] == pytest.approx(1.0, abs=1e-4)
    assert main(["train", "--model", "clsa-tiny", "--out", str(run), "--steps", "2", "--schedule", "nope"]) == 2
    assert "LENGTH:SHARE" in capsys.readouterr().err


def test_progress_lines_without_tqdm(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU image has no tqdm: the fallback takes tqdm's calls as the trainers make them."""
    from services.train.progress import _Lines

    bar = _Lines(range(3), desc="distill", unit="step", dynamic_ncols=True)  # total from len(), as tqdm
    bar.set_postfix(kl="0.5")
    assert list(bar) == [0, 1, 2]
    assert "distill: 3/3 kl=0.5" in capsys.readouterr().err
    assert list(_Lines(iter([7]), desc="x", disable=True)) == [7]


def test_a_corpus_larger_than_the_budget_is_sampled_across_its_files(tmp_path: Path) -> None:
    from services.train.data import read_text

    files = []
    for i in range(10):
        files.append(tmp_path / f"f{i}.py")
        files[-1].write_bytes(f"# file {i}\n".encode() * 100)  # 900 bytes each
    text = read_text(files, 3000)
    # Every 4th file first (0, 4, 8: 2,706 bytes), then the rest topped up from the files skipped.
    assert len(text) == 3000 and text.index(b"# file 4") < text.index(b"# file 8") < text.index(b"# file 1")
    assert b"# file 2" not in text
    assert len(read_text(files, 100_000)) == 10 * 902  # under the budget: all of it
    # Files of uneven sizes whose every n-th one falls short: topped up from the others.
    sizes = [100, 5000, 100, 5000, 100, 5000, 100, 5000]
    uneven = []
    for i, size in enumerate(sizes):
        uneven.append(tmp_path / f"u{i}.txt")
        uneven[-1].write_bytes(bytes([97 + i]) * size)
    text = read_text(uneven, 8000)
    assert len(text) == 8000 and text.startswith(b"a" * 100)
