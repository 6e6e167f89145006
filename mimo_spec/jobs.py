"""The run actions beyond inspecting a config: train, eval, generate, import."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mimo_spec.errors import ConfigError
from mimo_spec.env_secrets import redact_env_values
from mimo_spec.rundir import write_text_atomic


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


def check_run_config(cfg: DictConfig, model=None) -> None:
    """The train, data, eval and generate sections and the top-level seed, checked together (one
    error listing every problem), then what the run would need against this machine's memory.

    ``model``: the config's model (e.g. built on the meta device by ``action=validate``); with it,
    a training step's memory and ``generate.max_new_tokens`` are checked against it too.
    """
    from mimo_spec.errors import ProblemCollector
    from mimo_spec.data import validate_data_config
    from mimo_spec.train.schema import SEED_MAX, validate_eval_config, validate_generate_config, validate_train_config
    from mimo_spec.train.schema import validate_summary_config

    problems = ProblemCollector()
    checked = {}
    for section, check in (("train", validate_train_config), ("data", validate_data_config),
                           ("eval", validate_eval_config), ("generate", validate_generate_config),
                           ("summary", validate_summary_config)):
        if section in cfg:
            try:
                checked[section] = check(cfg[section])
            except ConfigError as e:
                problems.extend(e)
    seed = cfg.get("seed", 0)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX):
        problems.add("seed", f"expected an integer in [0, 2**63), got {type(seed).__name__} {seed!r}",
                     "set seed=0 (or any integer below 2**63)")
    problems.raise_if_any()
    check_run_resources(cfg, checked, model)


def check_run_resources(cfg: DictConfig, checked: dict, model=None) -> None:
    """What a run would allocate, estimated from the config (and ``model``), against this machine's memory."""
    from mimo_spec.train.limits import check_step_memory, machine_memory, require_fits

    data = checked.get("data")
    if data is not None and getattr(data, "source", None) == "synthetic":
        require_fits(8 * data.num_samples, machine_memory(), f"the sample order of {data.num_samples:,} training "
                     "samples", "data.num_samples", "lower data.num_samples (one epoch); more steps repeat the epochs")
    if model is None:
        return
    lm_max = getattr(getattr(model, "language_model", None), "max_seq_len", None)
    gen = checked.get("generate")
    if gen is not None and lm_max and gen.max_new_tokens > int(lm_max):
        raise ConfigError(f"{gen.max_new_tokens} new tokens exceed the language model's max_seq_len {lm_max} "
                          "(prompt and answer share it)", path="generate.max_new_tokens",
                          hint=f"set generate.max_new_tokens below {lm_max}")
    train = checked.get("train")
    if train is not None and data is not None:
        # without the data: a sample is at least its token ids and labels (int64) at a floor of 16 tokens
        tokens = min(16, int(data.max_seq_len or lm_max or 16))
        check_step_memory(model, None, train.model_dump(), "cpu", sample=(16.0 * tokens, float(tokens)),
                          host_only=True)


def checkpoint_config(source: str | None, key: str) -> tuple[Path, DictConfig]:
    """The checkpoint folder a run dir or folder names, and the config it was trained with."""
    from mimo_spec.train.checkpoint import list_checkpoints

    if OmegaConf.is_config(source) or isinstance(source, (bool, list, dict)):
        shown = OmegaConf.to_container(source) if OmegaConf.is_config(source) else source
        raise ConfigError(f"expected a path (a string), got {type(shown).__name__} {shown!r}", path=f"{key}.checkpoint",
                          hint=f"set {key}.checkpoint to a run directory or its checkpoints/step_NNNNNN folder")
    if isinstance(source, (int, float)):
        source = str(source)
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
    from mimo_spec.errors import CheckpointError
    from mimo_spec.train.checkpoint import read_state

    config = read_state(path).get("config")  # a damaged or foreign state.json is a checkpoint error
    if not isinstance(config, dict):
        raise CheckpointError("state.json holds no training config (a 'config' object)", path=str(path / "state.json"),
                              hint="point at a checkpoint written by mimo-spec's train action")
    return path, OmegaConf.create(config)


def _trust_only_this_command(trained_cfg: DictConfig, cfg: DictConfig, path: Path) -> None:
    """A checkpoint's state.json is a file from disk: the imports it allows are not the user's word. Its
    ``allow_imports`` must be covered by this command's own; what is trusted is this command's list."""
    def prefixes(c) -> list[str]:
        value = c.get("allow_imports") or []
        return [value] if isinstance(value, str) else [str(v) for v in value]

    mine = prefixes(cfg)
    untrusted = [p for p in prefixes(trained_cfg)
                 if not any(p == m or p.startswith(m if m.endswith(".") else m + ".") for m in mine)]
    if untrusted:
        raise ConfigError(f"the checkpoint's config imports {', '.join(untrusted)} (its allow_imports), which "
                          f"this command does not allow", path="allow_imports",
                          hint=f"if you trust the code the checkpoint {path} names, pass "
                          f"allow_imports=[{','.join(untrusted)}] on this command")
    with open_dict(trained_cfg):
        trained_cfg.allow_imports = list(mine)


def _load_trained(cfg: DictConfig, key: str, own_layout: bool = False):
    """The checkpoint's model (built from the config it was trained with) and tokenizer.

    ``own_layout``: the job runs under this command's ``parallel`` layout, not the training run's
    (a checkpoint loads under any layout), so the model is checked against it.
    """
    from mimo_spec.builders import build_model
    from mimo_spec.parallel.env import run_device
    from mimo_spec.train.checkpoint import load_checkpoint
    from mimo_spec.train.loop import check_backend_device
    from mimo_spec.data.tokenizer import build_tokenizer

    path, trained_cfg = checkpoint_config(cfg[key].get("checkpoint"), key)
    _trust_only_this_command(trained_cfg, cfg, path)
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
    layout (pipeline and split layouts evaluate each data-parallel rank's share) and rank 0 writes.
    SIGTERM ends it at once (exit 128 + signal): an evaluation has nothing to save."""
    from mimo_spec.train.limits import JobSignals

    check_run_config(cfg)
    with JobSignals("evaluating"):
        return _run_eval(cfg, out_dir)


def _run_eval(cfg: DictConfig, out_dir: Path) -> int:
    from mimo_spec.parallel.parallelize import start_parallel
    from mimo_spec.data import build_dataset, collate
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
    write_text_atomic(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    print(f"eval loss {result['eval_loss']:.4f}  perplexity {result['eval_ppl']:.2f}  "
          f"({result['eval_tokens']} tokens, {path})")
    return 0


def run_generate(cfg: DictConfig, out_dir: Path) -> int:
    """Continue ``generate.prompt`` from a checkpoint. SIGTERM ends it at once (exit 128 + signal)."""
    from mimo_spec.train.limits import JobSignals

    check_run_config(cfg)
    with JobSignals("generating"):
        return _run_generate(cfg, out_dir)


def _new_tokens(model, prompt_tokens: int, asked: int, device) -> int:
    """``generate.max_new_tokens``, clamped (with a note) to what the LM's max_seq_len leaves after the prompt;
    refused when even the prompt does not fit, or when the cache cannot fit in memory."""
    import sys

    from mimo_spec.errors import InputError
    from mimo_spec.train.limits import check_generation_memory

    lm_max = getattr(model.language_model, "max_seq_len", None)
    extra = sum(m.num_generation_tokens for m in model.modalities.values() if m.has_output)
    if lm_max:
        lm_max = int(lm_max)
        if asked > lm_max:
            raise ConfigError(f"{asked} new tokens exceed the language model's max_seq_len {lm_max} (prompt and "
                              "answer share it)", path="generate.max_new_tokens",
                              hint=f"set generate.max_new_tokens to at most {max(1, lm_max - prompt_tokens - extra)}")
        room = lm_max - prompt_tokens - extra
        if room < 1:
            raise InputError(f"the prompt takes {prompt_tokens} tokens" + (f" (+{extra} for an output item)" if extra
                             else "") + f", leaving no room for an answer in the language model's max_seq_len "
                             f"{lm_max}", path="generate.prompt", hint="shorten the prompt or give fewer files")
        if asked > room:
            print(f"note: generate.max_new_tokens={asked} does not fit after the {prompt_tokens}-token prompt in the "
                  f"language model's max_seq_len {lm_max}: generating at most {room} tokens", file=sys.stderr)
            asked = room
    check_generation_memory(model, prompt_tokens + extra, asked, device)
    return asked


def _run_generate(cfg: DictConfig, out_dir: Path) -> int:
    from mimo_spec.data import encode_prompt
    from mimo_spec.generation import generate, save_image, start_parallel_generation
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
    max_new = _new_tokens(model, int(input_ids.shape[1]), int(g.max_new_tokens), device)  # before the KV cache
    out = generate(model, input_ids, modality_inputs, max_new_tokens=max_new, strategy=g.strategy,
                   temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p),
                   eos_id=tokenizer.eos_id, use_cache=bool(g.kv_cache), seed=int(g.seed))
    if not main:  # rank 0 prints and writes the outputs
        return 0
    specials = {m.generation_token_id for m in model.modalities.values() if m.has_output}
    text = tokenizer.decode([t for t in out.tokens if t not in specials and t < tokenizer.vocab_size])
    print(text)
    record = {"prompt": redact_env_values(str(g.prompt), cfg), "tokens": out.tokens, "text": text, "outputs": {}}
    for name, items in out.outputs.items():
        for i, item in enumerate(items):
            if item.dim() == 3:
                file = out_dir / f"generated_{name}_{i}.png"
                save_image(item, file)
                record["outputs"].setdefault(name, []).append(str(file))
                print(f"{name}: wrote {file}")
    write_text_atomic(out_dir / "generation.json", json.dumps(record, indent=2) + "\n")
    return 0


def run_import(cfg: DictConfig, out_dir: Path) -> int:
    from mimo_spec.interop import import_hf_to_dir

    spec = cfg.import_hf
    if not spec.get("source"):
        raise ConfigError("missing: the Hugging Face checkpoint directory to import", path="import_hf.source",
                          hint="set import_hf.source=/path/to/hf_model")
    for key in ("source", "output"):
        if spec.get(key) is not None and not isinstance(spec.get(key), str):
            raise ConfigError(f"expected a folder path (a string), got {spec.get(key)!r}", path=f"import_hf.{key}")
    output = Path(spec.get("output") or out_dir / "imported")
    yaml_path, weights_path = import_hf_to_dir(spec.source, output)
    print(f"wrote {yaml_path} and {weights_path}")
    print(f"use it: mimo-spec init_from={output.resolve()} action=summary   (or build_model('{yaml_path}'))")
    return 0
