"""Preference training (``train.objective: dpo``): the loss against TRL's sigmoid DPO formula written out here,
sequence log-probabilities against a hand computation, preference pairs from JSON / WebDataset / Parquet,
collated pairs, clear errors, a tiny LLaVA-style model whose chosen-vs-rejected margin grows, the CLI's metrics
columns, and DDP / FSDP (2 gloo ranks) equal to one process.

Run as a script under torchrun (``test_dpo_layouts_match_one_process``), it trains the DDP and FSDP runs."""

import csv
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from make_dpo_data import make_dataset  # noqa: E402

DPO_OVERRIDES = ["data.packing=false", "data.eval_fraction=0.1", "train.objective=dpo", "train.batch_size=4",
                 "train.lr=2e-3", "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1",
                 "train.checkpoint.every=0", "train.log_every=100", "train.weight_decay=0.0",
                 "model.params.num_layers=1", "model.params.hidden_size=64", "model.params.ffn_hidden_size=128"]


def dpo_config(data_dir: Path, extra=(), layout: str = "single"):
    from mimo_spec.config import compose_config

    return compose_config([f"parallel={layout}", "data=llava_json", f"data.path={data_dir / 'pairs.jsonl'}",
                           *DPO_OVERRIDES, *extra])


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- the loss and the log-probabilities ----------------------------------------------------------------


def test_dpo_loss_is_trl_sigmoid_formula():
    """dpo_loss equals -(1-ls) log sigmoid(beta z) - ls log sigmoid(-beta z), z = (pi_c - pi_r) - (ref_c - ref_r),
    computed here in Python floats, with and without label smoothing; the rewards are beta * (pi - ref)."""
    from mimo_spec.loss import dpo_loss

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 20 for _ in range(4))

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    for beta, ls in ((0.1, 0.0), (0.5, 0.2), (0.05, 0.5)):
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, ls)
        for i in range(7):
            z = (float(pc[i]) - float(pr[i])) - (float(rc[i]) - float(rr[i]))
            want = -(1 - ls) * log_sigmoid(beta * z) - ls * log_sigmoid(-beta * z)
            assert float(losses[i]) == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert float(chosen[i]) == pytest.approx(beta * (float(pc[i]) - float(rc[i])), rel=1e-12)
            assert float(rejected[i]) == pytest.approx(beta * (float(pr[i]) - float(rr[i])), rel=1e-12)
    # equal policy and reference: log 2 per pair, whatever beta; the gradient pushes chosen up, rejected down
    p = pc.clone().requires_grad_(True)
    q = pr.clone().requires_grad_(True)
    loss, _, _ = dpo_loss(p, q, pc, pr, 0.1, 0.0)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    loss.sum().backward()
    assert (p.grad < 0).all() and (q.grad > 0).all()


def test_sequence_log_probs_by_hand():
    """Each row's summed log p(next label) over its labelled positions, by hand from full logits; the same from
    logits at the counted positions only; and from a tiny model's forward (full logits vs logits_at)."""
    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.loss import IGNORE_INDEX, counted_positions, sequence_log_probs

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX

    def by_hand(lg, lb):
        out = []
        for b in range(lb.shape[0]):
            total = 0.0
            for s in range(lb.shape[1] - 1):
                t = int(lb[b, s + 1])
                if t != IGNORE_INDEX:
                    row = [float(x) for x in lg[b, s]]
                    m = max(row)
                    total += row[t] - (m + math.log(sum(math.exp(x - m) for x in row)))
            out.append(total)
        return out

    want = by_hand(logits, labels)
    assert want[1] == 0.0
    assert sequence_log_probs(logits, labels).tolist() == pytest.approx(want, rel=1e-6)
    pos = counted_positions(labels)
    flat = logits.reshape(-1, 11).index_select(0, pos)
    assert sequence_log_probs(flat, labels, positions=pos).tolist() == pytest.approx(want, rel=1e-6)

    model = build_model(compose_config(["model.params.num_layers=1", "model.params.hidden_size=64",
                                        "model.params.ffn_hidden_size=128", "modality=[]"]), seed=0)
    with torch.no_grad():
        for p in model.parameters():  # perturbed: no unit norms or zero biases
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
        ids = torch.randint(0, 200, (2, 9), generator=g)
        lab = ids.clone()
        lab[0, :4] = IGNORE_INDEX
        lab[1, :7] = IGNORE_INDEX
        full = model(input_ids=ids).logits.double()
        pos = counted_positions(lab)
        at = model(input_ids=ids, logits_at=pos)
        got = sequence_log_probs(at.logits, lab, positions=at.logits_at)
    assert got.tolist() == pytest.approx(by_hand(full, lab), rel=1e-5)


# ---- data ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_data")
    make_dataset(out, samples=32, webdataset=2, parquet=True)
    return out


def _dataset(cfg, model, split="train"):
    from mimo_spec.data import build_dataset
    from mimo_spec.data.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.data, model)
    ds = build_dataset(cfg.data, model, tok, split)
    ds.use_pairs()
    return ds, tok


def test_pairs_from_json_webdataset_parquet_and_collate(pairs_dir):
    """A pair's chosen / rejected rows share the prompt and its image; only the final answer is labelled (an earlier
    answer in a two-turn prompt is not); the same record read from tar shards and from Parquet (prompt as plain
    text) gives the same sample; whole-conversation answers give the same turns as answer strings; collate makes
    adjacent rows and counts valid pairs (a filler pair is not valid); a record without a pair is a DataError
    naming the file and the line."""
    from mimo_spec.builders import build_model
    from mimo_spec.data.batch import collate, filler_sample
    from mimo_spec.data.records import Record
    from mimo_spec.data.samples import pair_turns
    from mimo_spec.errors import DataError
    from mimo_spec.loss import IGNORE_INDEX

    cfg = dpo_config(pairs_dir, ["data.eval_fraction=0"])
    model = build_model(cfg, device="meta")
    ds, tok = _dataset(cfg, model)
    records = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]

    def answer(ids, labels):
        kept = [int(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert kept[-1] == tok.eos_id
        return bytes(kept[:-1]).decode()

    for i in (0, 3):
        s = ds[i]
        assert answer(s["input_ids"], s["labels"]) == records[i]["chosen"]
        assert answer(s["rejected_input_ids"], s["rejected_labels"]) == records[i]["rejected"]
        n = int((s["labels"] != IGNORE_INDEX).nonzero()[0]) - 1  # the shared prompt, up to the answer
        assert torch.equal(s["input_ids"][:n], s["rejected_input_ids"][:n])
        assert sum(s["num_items"].values()) == 1
    assert b"Yes." in bytes(int(t) for t in ds[3]["input_ids"] if t < 256)  # the earlier turn is in the prompt

    for extra in (["data=webdataset", f"data.path={pairs_dir / 'shards'}"],
                  ["data=parquet", f"data.path={pairs_dir / 'pairs.parquet'}", "data.conversations_column=question"]):
        other, _ = _dataset(dpo_config(pairs_dir, [*extra, "data.eval_fraction=0"]), model)
        a, b = ds[0], other[0]
        for key in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
            assert torch.equal(a[key], b[key]), (extra[0], key)
        items_a, items_b = next(iter(a["items"].values())), next(iter(b["items"].values()))
        for enc in items_a:
            for kw in items_a[enc]:
                assert torch.equal(items_a[enc][kw], items_b[enc][kw])

    prompt = [{"from": "human", "value": "<image>\nQ?"}]
    plain = pair_turns(Record(conversations=prompt, extra={"chosen": "A.", "rejected": "B."}))
    whole = pair_turns(Record(conversations=None, extra={
        "chosen": prompt + [{"role": "assistant", "content": "A."}],
        "rejected": prompt + [{"role": "assistant", "content": "B."}]}))
    question = pair_turns(Record(conversations=None, extra={"question": "<image>\nQ?", "chosen": "A.",
                                                            "rejected": [{"from": "gpt", "value": "B."}]}))
    assert plain == whole == question == ([["user", "<image>\nQ?"]], ["assistant", "A."], ["assistant", "B."])

    batch = collate([ds[0], filler_sample(ds[1]), ds[2]], tok.pad_id)
    assert batch["input_ids"].shape[0] == 6 and batch["pair_valid"].tolist() == [True, False, True]
    assert batch["num_tokens"] == 2
    assert torch.equal(batch["labels"][0, :ds[0]["labels"].shape[0]], ds[0]["labels"])
    assert torch.equal(batch["input_ids"][5, :ds[2]["rejected_input_ids"].shape[0]], ds[2]["rejected_input_ids"])
    assert next(iter(batch["items_per_sample"].values())) == [1, 1, 0, 0, 1, 1]

    from mimo_spec.data import build_dataset

    as_sft = build_dataset(cfg.data, model, tok, "train")  # pairs read as SFT data: the hint names the objective
    with pytest.raises(DataError) as e:
        as_sft.encoded(0)
    assert "train.objective=dpo" in e.value.problems[0].hint

    bad = pairs_dir / "sft.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "images/red.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    sft, _ = _dataset(dpo_config(pairs_dir, [f"data.path={bad}", "data.eval_fraction=0"]), model)
    with pytest.raises(DataError) as e:
        sft.encoded(0)
    assert "sft.jsonl: line 1" in e.value.problems[0].path and "no preference pair" in str(e.value)


def test_dpo_config_errors(pairs_dir, tmp_path):
    """Synthetic data, packing, data without pairs, and pipeline / split layouts are refused by name."""
    from mimo_spec.config import compose_config
    from mimo_spec.errors import ConfigError, DataError
    from mimo_spec.train.loop import train
    from mimo_spec.train.preference import DPO
    from mimo_spec.train.schema import validate_train_config

    with pytest.raises(ConfigError) as e:
        train(compose_config(["train.objective=dpo", "train.steps=1", "data.num_samples=8"]), tmp_path / "a")
    assert e.value.problems[0].path == "train.objective" and "synthetic" in str(e.value)
    with pytest.raises(ConfigError) as e:
        train(dpo_config(pairs_dir, ["data.packing=true", "train.steps=1"]), tmp_path / "b")
    assert e.value.problems[0].path == "data.packing"
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "Q?"},
                                                         {"from": "gpt", "value": "A."}]}) + "\n" for _ in range(4)))
    with pytest.raises(DataError) as e:
        train(dpo_config(pairs_dir, [f"data.path={sft}", "train.steps=1"]), tmp_path / "c")
    assert "sft.jsonl: line " in e.value.problems[0].path and "no preference pair" in str(e.value)
    # action=validate / action=data read the records as training will: pairs under dpo (all usable), not SFT turns
    from mimo_spec.data.stats import scan_run_data, validate_scan_config
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.run_config import RunConfig, build_meta_model

    for objective, usable in (("dpo", True), ("sft", False)):
        cfg = dpo_config(pairs_dir, [f"train.objective={objective}"])
        meta = build_meta_model(cfg)
        run = RunConfig.from_config(cfg, spec=meta.spec)
        scan = scan_run_data(run, meta, build_tokenizer(run.data, meta), validate_scan_config({"max_samples": 6}))[0]
        if usable:
            assert scan.scanned == 6 and scan.usable == 6 and not scan.problems, scan.problems[:2]
        else:  # the generator's pairs given as answer texts have no assistant turn of their own
            assert scan.usable < 6 and "no assistant answer" in scan.problems[0].reason
    for drun, what in ((SimpleNamespace(pipeline=object(), split=None, bridges={}, pp=2), "pipeline"),
                       (SimpleNamespace(pipeline=None, split=object(), bridges={}, pp=1), "split")):
        with pytest.raises(ConfigError) as e:
            DPO.check_layout(drun)
        assert e.value.problems[0].path == "parallel" and what in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_train_config({"steps": 1, "batch_size": 1, "lr": 0.1, "objective": "ppo"})
    assert e.value.problems[0].path == "train.objective"
    with pytest.raises(ConfigError) as e:
        validate_train_config({"steps": 1, "batch_size": 1, "lr": 0.1, "dpo": {"beta": 0.0, "label_smoothing": 0.7}})
    assert {p.path for p in e.value.problems} == {"train.dpo.beta", "train.dpo.label_smoothing"}


# ---- training -----------------------------------------------------------------------------------------


def test_dpo_training_grows_the_margin_and_cli_metrics(pairs_dir, cli):
    """A tiny LLaVA-style model (CLIP-style ViT, projector, Llama-style LM) trained with DPO: the first step's loss is
    log 2 (policy = reference) and the chosen-vs-rejected margin and accuracy grow. The CLI run writes the DPO columns
    and eval numbers, and its progress lines show them."""
    r = cli(*dpo_config_args(pairs_dir), "train.steps=8", "train.eval_every=8", "train.eval_batches=2",
            "train.batch_size=8", "train.schedule=constant", "train.dpo.label_smoothing=0.1", "train.log_every=4",
            "hydra.run.dir=run")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = _rows(cli.cwd / "run")
    for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
                "logp_rejected", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert key in rows[0], key
    assert "acc " in r.stdout and "margin" in r.stdout
    # step 1: z = 0, loss = -(1 - ls) log sigmoid(0) - ls log sigmoid(0) = log 2 for any label smoothing ls
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6) and float(rows[0]["reward_margin"]) == 0
    margins = [float(r["reward_margin"]) for r in rows]
    assert margins[-1] > 0.3 and sum(margins[-3:]) > sum(margins[:3]) + 0.3, margins
    assert float(rows[-1]["loss"]) < math.log(2) - 0.1
    assert float(rows[-1]["reward_accuracy"]) >= 0.75
    assert rows[-1]["eval_loss"] and float(rows[-1]["eval_reward_margin"]) > 0
    # action=eval on the checkpoint rebuilds the run's reference (the model it started from) and reports the DPO
    # numbers the run's last evaluation logged (same weights, same pairs); its perplexity-free line says so
    ev = cli("action=eval", f"eval.checkpoint={cli.cwd / 'run'}", "eval.batches=2", "hydra.run.dir=ev")
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-4000:]
    result = json.loads((cli.cwd / "ev" / "eval.json").read_text())
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert result[key] == pytest.approx(float(rows[-1][key]), rel=1e-4, abs=1e-6), key
    assert result["eval_loss"] < math.log(2) - 0.05 and "eval DPO loss" in ev.stdout


def test_dpo_reference_is_the_starting_model_with_adapters_trainable_modules_and_dropout(pairs_dir, tmp_path):
    """The reference is the model as training starts, whatever trains:
    - LoRA adapters alone: the same model with its adapters switched off (no copy);
    - adapters plus trainable modules (a projector): a frozen copy, since switching the adapters off would keep
      the projector's trained weights (the reference moved with training);
    and it runs in eval mode, so with model dropout its log-probabilities do not vary; the policy's dropout is
    off under DPO (train.dpo.disable_dropout, TRL's default), so a run's first loss is log 2 in every case."""
    from mimo_spec.builders import build_model
    from mimo_spec.data.batch import collate
    from mimo_spec.peft import adapters_disabled, adapters_of
    from mimo_spec.train.loop import train
    from mimo_spec.train.preference import Reference, row_log_probs

    lora = "adapters=[{modules: 'language_model.layers.*.attn.*', type: lora, rank: 4, alpha: 8}]"
    projector = "trainable=['modalities.*.input_projections.*']"
    for extra in ([lora], [lora, projector]):
        cfg = dpo_config(pairs_dir, extra)
        model = build_model(cfg, seed=0)
        ds, tok = _dataset(cfg, model)
        batch = collate([ds[0], ds[1]], tok.pad_id)
        with torch.no_grad():
            start = row_log_probs(model, batch, "cpu", "fp32")[0]
        ref = Reference.of(model)
        assert (ref.frozen is None) == (len(extra) == 1)
        with torch.no_grad():  # training moves every trained tensor
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
            policy = row_log_probs(model, batch, "cpu", "fp32")[0]
            base = ref.log_probs(model, batch, "cpu", "fp32")
            with adapters_disabled(model):
                adapters_off = row_log_probs(model, batch, "cpu", "fp32")[0]
        torch.testing.assert_close(base, start, rtol=0, atol=1e-5)
        assert not torch.allclose(policy, base, atol=1e-3)
        if len(extra) == 2:  # the adapters-off model is not the start any more: its projector moved
            assert not torch.allclose(adapters_off, start, atol=1e-3)
        assert next(adapters_of(model))[2].enabled  # switched back on

    # dropout: the reference is deterministic in a training-mode model, the policy's dropout goes off
    from mimo_spec.train.preference import disable_dropout

    for extra in ([lora], []):
        cfg = dpo_config(pairs_dir, [*extra, "+model.params.dropout=0.3"])
        model = build_model(cfg, seed=0).train()
        ds, tok = _dataset(cfg, model)
        batch = collate([ds[0], ds[1]], tok.pad_id)
        ref = Reference.of(model)
        first, second = (ref.log_probs(model, batch, "cpu", "fp32") for _ in range(2))
        assert torch.equal(first, second) and model.training
        with torch.no_grad():
            noisy = [row_log_probs(model, batch, "cpu", "fp32")[0] for _ in range(2)]
            assert not torch.allclose(*noisy, atol=1e-3)  # the dropout is real
            assert disable_dropout(model) > 0
            torch.testing.assert_close(row_log_probs(model, batch, "cpu", "fp32")[0], first, rtol=0, atol=1e-5)

    for name, extra in (("lora", [lora]), ("lora_projector", [lora, projector]), ("dropout", ["+model.params.dropout=0.3"])):
        result = train(dpo_config(pairs_dir, [*extra, "train.steps=2", "train.lr=0.01"]), tmp_path / name)
        rows = _rows(tmp_path / name)
        assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6), name
        if name != "dropout":
            assert result["trainable_parameters"] < result["parameters"] / 4
    # with adapters and a trainable projector the run learns (the reference stays put): the loss moves off log 2
    assert float(_rows(tmp_path / "lora_projector")[-1]["loss"]) < math.log(2) - 1e-4


def dpo_config_args(data_dir: Path) -> list[str]:
    return ["data=llava_json", f"data.path={data_dir / 'pairs.jsonl'}", *DPO_OVERRIDES]


# ---- layouts ------------------------------------------------------------------------------------------


def test_dpo_layouts_match_one_process(pairs_dir, tmp_path):
    """DDP and FSDP on 2 gloo ranks (each rank loads its own whole pairs) and TP 2 (logits sharded on the vocabulary:
    the log-probabilities under loss_parallel) train the same losses, rewards and eval numbers as one process (a
    frozen reference replica on every rank); so does one process accumulating two micro-batches of half the pairs."""
    from conftest import ROOT
    from ranks import run_ranks
    from test_parallel_run import RTOL

    from mimo_spec.train.loop import train

    r = run_ranks(2, ROOT / "tests" / "test_dpo.py", tmp_path, pairs_dir, "ddp,fsdp,tp2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(dpo_config(pairs_dir, LAYOUT_RUN), tmp_path / "single")
    want = _rows(tmp_path / "single")
    # two micro-batches of 2 pairs: each weighted by its share of the step's pairs, as one batch of 4
    train(dpo_config(pairs_dir, [*LAYOUT_RUN, "train.batch_size=2", "train.grad_accum=2"]), tmp_path / "accum")
    for layout in ("ddp", "fsdp", "tp2", "accum"):
        got = _rows(tmp_path / layout)
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            for key in ("loss", "reward_chosen", "reward_margin", "logp_chosen", "logp_rejected",
                        *(("eval_loss",) if layout != "accum" else ())):  # (accum: eval batches of 2 pairs)
                if b[key]:
                    assert float(a[key]) == pytest.approx(float(b[key]), rel=RTOL, abs=1e-6), (layout, key)


LAYOUT_RUN = ["train.steps=2", "train.eval_batches=1", "train.batch_size=4", "train.optimizer=sgd", "train.lr=0.5"]


if __name__ == "__main__":  # under torchrun: OUT_DIR DATA_DIR LAYOUT[,LAYOUT...]
    from mimo_spec.train.loop import train

    torch.set_num_threads(1)
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    for layout in sys.argv[3].split(","):
        train(dpo_config(data, LAYOUT_RUN, layout), out / layout)
        import gc

        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
