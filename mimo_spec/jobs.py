"""The run actions beyond inspecting a config: train, eval, generate, import."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mimo_spec.errors import ConfigError


def _console():
    from rich.console import Console

    return Console(highlight=False)


def run_train(cfg: DictConfig, out_dir: Path) -> int:
    from mimo_spec.train.loop import train

    check_run_config(cfg)
    console = _console()
    result = train(cfg, out_dir, console=console)
    from mimo_spec.parallel.env import read_env

    launched = read_env()
    if launched is not None and launched.rank != 0:  # the summary line comes from rank 0 only
        return 0
    console.print(f"{result['status']}: {result['steps']} steps, loss {result['first_loss']:.4f} -> "
                  f"{result['final_loss']:.4f}" + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"]
                                                   else "") + f"; outputs in {out_dir}")
    return 0


def check_run_config(cfg: DictConfig) -> None:
    """The train and data sections, checked together (one error listing every problem)."""
    from mimo_spec.errors import ProblemCollector
    from mimo_spec.train.data import validate_data_config
    from mimo_spec.train.schema import validate_train_config

    problems = ProblemCollector()
    for section, check in (("train", validate_train_config), ("data", validate_data_config)):
        if section in cfg:
            try:
                check(cfg[section])
            except ConfigError as e:
                problems.extend(e)
    problems.raise_if_any()


def checkpoint_config(source: str | None, key: str) -> tuple[Path, DictConfig]:
    """The checkpoint folder a run dir or folder names, and the config it was trained with."""
    from mimo_spec.train.checkpoint import list_checkpoints

    if not source:
        raise ConfigError("missing: which checkpoint to use", path=f"{key}.checkpoint",
                          hint=f"set {key}.checkpoint to a run directory or its checkpoints/step_NNNNNN folder")
    path = Path(source)
    if not (path / "state.json").exists():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise ConfigError(f"no checkpoint found in {path}", path=f"{key}.checkpoint",
                              hint="give a run directory or a checkpoints/step_NNNNNN folder")
        path = found[-1]
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path / 'state.json'}: {e}", path=f"{key}.checkpoint") from None
    return path, OmegaConf.create(state["config"])


def _load_trained(cfg: DictConfig, key: str, own_layout: bool = False):
    """The checkpoint's model (built from the config it was trained with) and tokenizer.

    ``own_layout``: the job runs under this command's ``parallel`` layout, not the training run's
    (a checkpoint loads under any layout), so the model is checked against it.
    """
    from mimo_spec.builders import build_model
    from mimo_spec.parallel.env import run_device
    from mimo_spec.train.checkpoint import load_checkpoint
    from mimo_spec.train.loop import check_backend_device
    from mimo_spec.train.tokenizer import build_tokenizer

    path, trained_cfg = checkpoint_config(cfg[key].get("checkpoint"), key)
    if own_layout:
        trained_cfg.parallel = OmegaConf.to_container(cfg.get("parallel") or {}, resolve=True)
    device = run_device((cfg.get("train") or {}).get("device"))  # this command's device, not the training run's
    model = build_model(trained_cfg, seed=0, device=device)
    check_backend_device(model, device)
    load_checkpoint(path, model)
    tokenizer = build_tokenizer(trained_cfg["data"], model)
    return path, trained_cfg, model, tokenizer


def run_eval(cfg: DictConfig, out_dir: Path) -> int:
    """Held-out loss of a checkpoint; under torchrun the model is sharded by this command's ``parallel``
    layout (pipeline and split layouts evaluate each data-parallel rank's share) and rank 0 writes."""
    from mimo_spec.parallel.apply import start_parallel
    from mimo_spec.train.data import build_dataset, collate
    from mimo_spec.train.loop import evaluate, model_max_len

    path, trained_cfg, model, tokenizer = _load_trained(cfg, "eval", own_layout=True)
    # the data follows the whole model's modalities: built before a pipeline stage drops some of them
    dataset = build_dataset(trained_cfg["data"], model, tokenizer, "eval")
    if len(dataset) == 0:
        raise ConfigError("the held-out split is empty", path="data", hint="set data.eval_samples / eval_fraction")
    tc = OmegaConf.to_container(trained_cfg.train, resolve=True)
    drun = start_parallel(OmegaConf.to_container(cfg.get("parallel") or {}, resolve=True), tc, model)
    collate_fn = lambda s: collate(s, tokenizer.pad_id)  # noqa: E731
    batch_size, batches = int(tc["batch_size"]), cfg.eval.get("batches")
    if drun is not None and drun.pp > 1:
        drun.start_pipeline(model, int(getattr(dataset, "max_len", model_max_len(model))), tokenizer.pad_id)
    if drun is not None and (drun.split or drun.pipeline) is not None:  # no rank holds the whole model
        from mimo_spec.parallel.pipeline import evaluate_distributed

        result = evaluate_distributed(drun, dataset, collate_fn, batch_size, batches)
    else:
        device = next(model.parameters()).device
        result = evaluate(model, dataset, collate_fn, batch_size, batches, tc.get("precision", "fp32"), device)
    if drun is not None and drun.rank != 0:
        return 0
    result["checkpoint"] = str(path)
    if drun is not None:
        result["layout"] = drun.layout.name
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"eval loss {result['eval_loss']:.4f}  perplexity {result['eval_ppl']:.2f}  "
          f"({result['eval_tokens']} tokens, {path})")
    return 0


def run_generate(cfg: DictConfig, out_dir: Path) -> int:
    from mimo_spec.train.data import encode_prompt
    from mimo_spec.train.generate import generate, save_image, start_parallel_generation
    from mimo_spec.train.loop import to_device

    g = cfg.generate
    path, trained_cfg, model, tokenizer = _load_trained(cfg, "generate", own_layout=True)
    # the prompt follows the whole model's modalities: encoded before a pipeline stage drops some of them
    input_ids, modality_inputs = encode_prompt(g.prompt, model, tokenizer, trained_cfg["data"],
                                               images=list(g.images), audio=list(g.audio))
    drun = start_parallel_generation(model, cfg.get("parallel"))  # under torchrun: every rank generates
    main = drun is None or drun.rank == 0
    device = next(model.parameters()).device
    input_ids, modality_inputs = to_device(input_ids, device), to_device(modality_inputs, device)
    out = generate(model, input_ids, modality_inputs, max_new_tokens=int(g.max_new_tokens), strategy=g.strategy,
                   temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p),
                   eos_id=tokenizer.eos_id, use_cache=bool(g.kv_cache), seed=int(g.seed))
    if not main:  # rank 0 prints and writes the outputs
        return 0
    specials = {m.generation_token_id for m in model.modalities.values() if m.has_output}
    text = tokenizer.decode([t for t in out.tokens if t not in specials and t < tokenizer.vocab_size])
    print(text)
    record = {"prompt": g.prompt, "tokens": out.tokens, "text": text, "outputs": {}}
    for name, items in out.outputs.items():
        for i, item in enumerate(items):
            if item.dim() == 3:
                file = out_dir / f"generated_{name}_{i}.png"
                save_image(item, file)
                record["outputs"].setdefault(name, []).append(str(file))
                print(f"{name}: wrote {file}")
    (out_dir / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def run_import(cfg: DictConfig, out_dir: Path) -> int:
    from mimo_spec.interop import import_hf_to_dir

    spec = cfg.import_hf
    if not spec.get("source"):
        raise ConfigError("missing: the Hugging Face checkpoint directory to import", path="import_hf.source",
                          hint="set import_hf.source=/path/to/hf_model")
    output = Path(spec.get("output") or out_dir / "imported")
    yaml_path, weights_path = import_hf_to_dir(spec.source, output)
    print(f"wrote {yaml_path} and {weights_path}")
    print(f"use it: mimo-spec init_from={output.resolve()} action=summary   (or build_model('{yaml_path}'))")
    return 0
