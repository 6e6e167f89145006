"""The run actions beyond inspecting a config: train, eval, generate, import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf, open_dict

from mimo_spec.errors import ConfigError
from mimo_spec.env_secrets import redact_env_values
from mimo_spec.rundir import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from mimo_spec.run_config import RunConfig


def _console():
    from rich.console import Console

    return Console(highlight=False)


def run_train(run: RunConfig | DictConfig, out_dir: Path) -> int:
    from mimo_spec.train.loop import train

    run = as_run_config(run)
    check_run_resources(run)
    console = _console()
    result = train(run, out_dir, console=console)
    from mimo_spec.parallel.env import read_env

    launched = read_env()
    if launched is not None and launched.rank != 0:  # the summary line comes from rank 0 only
        return 0
    console.print(f"{result['status']}: {result['steps']} steps, loss {result['first_loss']:.4f} -> "
                  f"{result['final_loss']:.4f}" + (f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"]
                                                   else "") + f"; outputs in {out_dir}")
    return 0


def as_run_config(run: RunConfig | DictConfig | dict) -> RunConfig:
    """``run`` itself, or the RunConfig of a composed config (every section checked, once)."""
    from mimo_spec.run_config import RunConfig

    return run if isinstance(run, RunConfig) else RunConfig.from_config(run)


def check_run_resources(run: RunConfig, model=None) -> None:
    """What a run would allocate, estimated from the config (and ``model``), against this machine's memory."""
    from mimo_spec.train.limits import check_step_memory, machine_memory, require_fits

    data = run.data
    if data is not None and getattr(data, "source", None) == "synthetic":
        require_fits(8 * data.num_samples, machine_memory(), f"the sample order of {data.num_samples:,} training "
                     "samples", "data.num_samples", "lower data.num_samples (one epoch); more steps repeat the epochs")
    if model is None:
        return
    lm_max = getattr(getattr(model, "language_model", None), "max_seq_len", None)
    gen = run.generate
    if gen is not None and lm_max and gen.max_new_tokens > int(lm_max):
        raise ConfigError(f"{gen.max_new_tokens} new tokens exceed the language model's max_seq_len {lm_max} "
                          "(prompt and answer share it)", path="generate.max_new_tokens",
                          hint=f"set generate.max_new_tokens below {lm_max}")
    train = run.train
    if train is not None and data is not None:
        # without the data: a sample is at least its token ids and labels (int64) at a floor of 16 tokens
        tokens = min(16, int(data.max_seq_len or lm_max or 16))
        check_step_memory(model, None, train, "cpu", sample=(16.0 * tokens, float(tokens)), host_only=True)


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


def _trust_only_this_command(trained_cfg: DictConfig, run: RunConfig, path: Path) -> None:
    """A checkpoint's state.json is a file from disk: the imports it allows are not the user's word. Its
    ``allow_imports`` must be covered by this command's own; what is trusted is this command's list."""
    value = trained_cfg.get("allow_imports") or []
    theirs = [value] if isinstance(value, str) else [str(v) for v in value]
    mine = list(run.allow_imports)
    untrusted = [p for p in theirs
                 if not any(p == m or p.startswith(m if m.endswith(".") else m + ".") for m in mine)]
    if untrusted:
        raise ConfigError(f"the checkpoint's config imports {', '.join(untrusted)} (its allow_imports), which "
                          f"this command does not allow", path="allow_imports",
                          hint=f"if you trust the code the checkpoint {path} names, pass "
                          f"allow_imports=[{','.join(untrusted)}] on this command")
    with open_dict(trained_cfg):
        trained_cfg.allow_imports = list(mine)


# overrides that would change the model a checkpoint's run built: eval and generate build that run's model
_MODEL_KEYS = ("model", "modality", "modalities", "preset", "dtype", "adapters", "trainable", "freeze", "backend",
               "init_from")
# a group override stands for these config paths
_GROUP_PATHS = {"preset": ("model", "modalities"), "modality": ("modalities",)}
# data keys tied to the model's inputs: an eval on other data keeps the checkpoint's unless set explicitly
_MODEL_BOUND_DATA = ("tokenizer", "template", "special_tokens_start", "image_mean", "image_std", "image_resize",
                     "image_resample", "image_processor")


def _same_as_trained(run: RunConfig, trained_cfg: DictConfig, key: str) -> bool:
    """Whether override ``key`` leaves the config as the checkpoint's run recorded it (naming the run's own
    model, as a layout check of the command's model may need: ``model=llama3_8b parallel=tp8``)."""
    if run.source is None:
        return False
    top = key.split(".")[0].split("/")[0]
    paths = _GROUP_PATHS.get(top, (key if "." in key else top,))
    source = run.source if OmegaConf.is_config(run.source) else OmegaConf.create(run.source)
    try:
        for path in paths:
            mine = OmegaConf.select(source, path)
            theirs = OmegaConf.select(trained_cfg, path)
            plain = [OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x for x in (mine, theirs)]
            if plain[0] != plain[1]:
                return False
    except Exception:  # noqa: BLE001 - an unresolvable value cannot be shown to be the same
        return False
    return True


def _check_checkpoint_overrides(run: RunConfig, key: str, trained_cfg: DictConfig) -> list[str]:
    """The data keys the command sets (eval takes them); a ConfigError for overrides the job would ignore: the
    model comes from the checkpoint's run, and so does generate's data. An override that names what the run
    recorded anyway is fine."""
    from mimo_spec.hydra_guard import override_keys

    keys = override_keys(run.command_overrides)
    ignored = [k for k in keys if k.split(".")[0].split("/")[0] in _MODEL_KEYS
               and not _same_as_trained(run, trained_cfg, k)]
    data = [k for k in keys if k == "data" or k.startswith("data.")]
    if key == "generate":
        ignored += data
    if ignored:
        what = "model" + (" and data" if key == "generate" else "")
        raise ConfigError(f"action={key} uses the {what} the checkpoint was trained with: {', '.join(ignored)} "
                          "would be ignored", path=ignored[0],
                          hint="drop it" + (" (to evaluate on other data, action=eval takes data.* overrides)"
                                            if key == "generate" else "; to change the model, train or import one"))
    return data


def _eval_data(trained_cfg: DictConfig, run: RunConfig, data_keys: list[str]):
    """The data action=eval reads: the checkpoint's run's, or with ``data.*`` / ``data=`` on the command line
    those values (a whole other data group keeps the checkpoint's tokenizer, template and image processing
    unless those are set too)."""
    from mimo_spec.data.config import validate_data_config

    trained = OmegaConf.to_container(trained_cfg["data"], resolve=True)
    if not data_keys:
        return validate_data_config(trained)
    command = OmegaConf.to_container(run.source["data"], resolve=True) if run.source is not None else {}
    explicit = {k.split(".")[1] for k in data_keys if "." in k}
    if "data" in data_keys:  # another data group: its values, the model-bound ones kept
        merged = dict(command)
        for k in _MODEL_BOUND_DATA:
            if k not in explicit and k in trained:
                merged[k] = trained[k]
    else:
        merged = dict(trained)
        for k in explicit:
            if k in command:
                merged[k] = command[k]
            else:
                merged.pop(k, None)
    return validate_data_config(merged)


def _load_trained(run: RunConfig, key: str):
    """The checkpoint's model (built from the config it was trained with, on this command's device), its
    train and data sections (typed) and its tokenizer.

    The job runs under this command's ``parallel`` layout, not the training run's (a checkpoint loads
    under any layout), so the model is checked against it.
    """
    from mimo_spec.builders import build_model
    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.parallel.env import run_device
    from mimo_spec.run_config import layout_check
    from mimo_spec.train.checkpoint import load_checkpoint
    from mimo_spec.train.loop import check_backend_device
    from mimo_spec.train.schema import TrainConfig, validate_section

    section = getattr(run, key)
    path, trained_cfg = checkpoint_config(section.checkpoint if section is not None else None, key)
    data_keys = _check_checkpoint_overrides(run, key, trained_cfg)
    _trust_only_this_command(trained_cfg, run, path)
    device = run_device(run.train.device if run.train is not None else None)  # this command's, not the training run's
    # in the dtype it was trained in (a bf16 run's weights stay bf16)
    from mimo_spec import peft

    # an adapter checkpoint holds no base: the one it was trained on (init_from's, or the training seed's)
    model = build_model(trained_cfg, seed=peft.training_seed(trained_cfg) if trained_cfg.get("adapters") else 0,
                        device=device, dtype=trained_cfg.get("dtype"), checks=[layout_check(run.parallel.layout)])
    check_backend_device(model, device)
    peft.load_trained_base(model, trained_cfg)
    load_checkpoint(path, model)
    trained_data = _eval_data(trained_cfg, run, data_keys) if key == "eval" else validate_data_config(trained_cfg["data"])
    tokenizer = build_tokenizer(trained_data, model)
    trained_train = validate_section("train", trained_cfg.get("train"), TrainConfig)
    return path, trained_train, trained_data, model, tokenizer


def run_eval(run: RunConfig | DictConfig, out_dir: Path) -> int:
    """Held-out loss of a checkpoint; under torchrun the model is sharded by this command's ``parallel``
    layout (pipeline and split layouts evaluate each data-parallel rank's share) and rank 0 writes.
    SIGTERM ends it at once (exit 128 + signal): an evaluation has nothing to save."""
    from mimo_spec.train.limits import JobSignals

    run = as_run_config(run)
    check_run_resources(run)
    with JobSignals("evaluating"):
        return _run_eval(run, out_dir)


PAIR_DATA_HINT_EVAL = "check the eval split's records hold a prompt and \"chosen\" / \"rejected\" answers"


def _run_eval(run: RunConfig, out_dir: Path) -> int:
    from mimo_spec.parallel.parallelize import start_parallel
    from mimo_spec.data import build_dataset
    from mimo_spec.train.loop import SkippingDataset, collate_skipping, evaluate, model_max_len

    path, trained_train, trained_data, model, tokenizer = _load_trained(run, "eval")
    # the data follows the whole model's modalities: built before a pipeline stage drops some of them
    dataset = build_dataset(trained_data, model, tokenizer, "eval")
    if len(dataset) == 0:
        raise ConfigError("the held-out split is empty", path="data", hint="set data.eval_samples / eval_fraction")
    objective = None
    if trained_train.objective == "dpo":  # the DPO loss against the run's reference, as training evaluated it
        from mimo_spec.train.preference import DPO

        _, trained_cfg = checkpoint_config(run.eval.checkpoint if run.eval is not None else None, "eval")
        objective = DPO.for_checkpoint(trained_cfg, trained_train, model, dataset,
                                       device=next(model.parameters()).device)
    drun = start_parallel(run.parallel.layout, trained_train.model_dump(), model)
    if objective is not None:
        objective.check_layout(drun)
    # unusable samples (unreadable files, over the length limit) are left out, as in training
    dataset = SkippingDataset(dataset)
    collate_fn = lambda s: collate_skipping(s, tokenizer.pad_id)  # noqa: E731
    batch_size, batches = trained_train.batch_size, run.eval.batches
    if drun is not None and drun.pp > 1:
        drun.start_pipeline(model, int(getattr(dataset, "max_len", model_max_len(model))), tokenizer.pad_id)
    device = next(model.parameters()).device
    # every layout (pipeline and split layouts share the batches out over their ranks)
    run_eval = evaluate if objective is None else objective.evaluate
    result = run_eval(model, dataset, collate_fn, batch_size, batches, trained_train.precision, device, drun=drun)
    if drun is not None and drun.rank != 0:
        return 0
    if not result and objective is not None:
        raise ConfigError("no usable preference pair in the held-out split", path="data", hint=PAIR_DATA_HINT_EVAL)
    result["checkpoint"] = str(path)
    if drun is not None:
        result["layout"] = drun.layout.name
    write_text_atomic(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    if objective is not None:
        print(f"eval DPO loss {result['eval_loss']:.4f}  reward accuracy {result['eval_reward_accuracy']:.2f}  "
              f"margin {result['eval_reward_margin']:.4f}  ({path})")
    else:
        print(f"eval loss {result['eval_loss']:.4f}  perplexity {result['eval_ppl']:.2f}  "
              f"({result['eval_tokens']} tokens, {path})")
    return 0


def run_generate(run: RunConfig | DictConfig, out_dir: Path) -> int:
    """Continue ``generate.prompt`` from a checkpoint. SIGTERM ends it at once (exit 128 + signal)."""
    from mimo_spec.train.limits import JobSignals

    run = as_run_config(run)
    check_run_resources(run)
    with JobSignals("generating"):
        return _run_generate(run, out_dir)


def _new_tokens(model, prompt_tokens: int, asked: int, device) -> int:
    """``generate.max_new_tokens``, clamped (with a note) to what the LM's max_seq_len leaves after the prompt;
    refused when even the prompt does not fit, or when the cache cannot fit in memory."""
    import sys

    from mimo_spec.errors import InputError
    from mimo_spec.train.limits import check_generation_memory

    lm_max = getattr(model.language_model, "max_seq_len", None)
    extra = max((m.num_generation_tokens + 2 for m in model.modalities.values() if m.has_output), default=0)
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


def _run_generate(run: RunConfig, out_dir: Path) -> int:
    from mimo_spec.data import encode_prompt
    from mimo_spec.data.tokenizer import stop_token_ids
    from mimo_spec.generation import generate, save_audio, save_image, start_parallel_generation
    from mimo_spec.data.batch import host_keys, to_device

    g = run.generate
    path, _, trained_data, model, tokenizer = _load_trained(run, "generate")
    # the prompt follows the whole model's modalities: encoded before a pipeline stage drops some of them
    input_ids, modality_inputs = encode_prompt(g.prompt, model, tokenizer, trained_data,
                                               images=list(g.images), audio=list(g.audio),
                                               videos=list(g.videos))
    drun = start_parallel_generation(model, run.parallel.layout)  # under torchrun: every rank generates
    main = drun is None or drun.rank == 0
    device = next(model.parameters()).device
    # the items' grids stay on the host, as in training: the towers read them there without a device sync
    input_ids, modality_inputs = to_device(input_ids, device), to_device(modality_inputs, device, host_keys(model))
    max_new = _new_tokens(model, int(input_ids.shape[1]), g.max_new_tokens, device)  # before the KV cache
    out = generate(model, input_ids, modality_inputs, max_new_tokens=max_new, strategy=g.strategy,
                   temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                   eos_id=stop_token_ids(tokenizer, trained_data.template), use_cache=g.kv_cache, seed=g.seed,
                   output_modality=g.output_modality, guidance_scale=g.guidance_scale, pad_id=tokenizer.pad_id,
                   bos_id=tokenizer.bos_id)
    if not main:  # rank 0 prints and writes the outputs
        return 0
    specials = {t for m in model.modalities.values() if m.has_output
                for t in (m.generation_token_id, getattr(m, "begin_token_id", None), getattr(m, "end_token_id", None))}
    text = tokenizer.decode([t for t in out.tokens if t not in specials and t < tokenizer.vocab_size])
    print(text)
    record = {"prompt": redact_env_values(str(g.prompt), run.source), "tokens": out.tokens, "text": text, "outputs": {}}
    for name, items in out.outputs.items():
        mod = model.modalities[name]
        for i, item in enumerate(items):
            if item.dim() == 3:  # an image (C, H, W): a tokenizer's range mapped to [0, 1]
                file = out_dir / f"generated_{name}_{i}.png"
                from mimo_spec.data.targets import image_range

                low = float(image_range(mod)[0])
                save_image((item + 1) / 2 if low < 0 else item, file)
            elif item.dim() == 1:  # an audio clip (samples,)
                file = out_dir / f"generated_{name}_{i}.wav"
                save_audio(item, int(getattr(mod.tokenizer, "sampling_rate", 16000)), file)
            else:
                continue
            record["outputs"].setdefault(name, []).append(str(file))
            print(f"{name}: wrote {file}")
    if out.codes:
        record["codes"] = {name: [c.tolist() for c in codes] for name, codes in out.codes.items()}
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
