"""The Python API's inputs: every bad batch given to ``model(...)`` / ``model.prepare_inputs(...)`` is an
InputError naming the argument, never a raw IndexError or a silently wrong result; good batches (ignore
index, precomputed embeddings) still run, and the checks that read values stay out of compiled graphs."""

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.errors import InputError

from conftest import tiny_config

IMG = 250  # tiny_config's image placeholder; vocab 256, hidden 32, 4 placeholders per 16x16 image


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(), seed=0).eval()


@pytest.fixture(scope="module")
def batch(model):
    return model.example_inputs(2)


def _with(batch, **changes):
    out = dict(batch)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _bad_batches(batch):
    ids, labels = batch["input_ids"], batch["labels"]
    b, s = ids.shape
    px = batch["modality_inputs"]["images"]["clip"]["pixel_values"]
    emb = torch.zeros(2 * 4, 32)
    above = ids.clone()
    above[1, 3] = 256
    negative = ids.clone()
    negative[0, 0] = -1
    bad_label = labels.clone()
    bad_label[0, 2] = 300
    neg_label = labels.clone()
    neg_label[1, 1] = -5
    return {
        # name: (batch changes, argument named, message)
        "id_at_vocab_size": (dict(input_ids=above), "input_ids", "token id 256 is outside the vocabulary [0, 256)"),
        "id_negative": (dict(input_ids=negative), "input_ids", "token id -1 is outside the vocabulary"),
        "ids_float": (dict(input_ids=ids.float()), "input_ids",
                      "expected integer token ids (int64), got torch.float32"),
        "ids_bool": (dict(input_ids=ids > 3), "input_ids", "got torch.bool"),
        "ids_int16": (dict(input_ids=ids.short()), "input_ids", "got torch.int16"),
        "ids_a_list": (dict(input_ids=ids.tolist()), "input_ids", "as a tensor, got list"),
        "ids_meta": (dict(input_ids=ids.to("meta")), "input_ids", "meta tensor"),
        "label_above_vocab": (dict(labels=bad_label), "labels", "label 300 is outside the vocabulary [0, 256)"),
        "label_negative_not_ignore": (dict(labels=neg_label), "labels", "label -5 is outside the vocabulary"),
        "labels_float": (dict(labels=labels.float()), "labels", "expected int64 token ids"),
        "labels_int32": (dict(labels=labels.int()), "labels", "got torch.int32"),
        "labels_meta": (dict(labels=labels.to("meta")), "labels", "labels is on meta but input_ids is on cpu"),
        "attention_mask_wrong_shape": (dict(attention_mask=torch.ones(b, s + 1)), "attention_mask",
                                       f"expected shape {(b, s)} (same as input_ids), got {(b, s + 1)}"),
        "attention_mask_4d": (dict(attention_mask=torch.ones(b, 1, s, s)), "attention_mask", "got (2, 1,"),
        "position_ids_wrong_shape": (dict(position_ids=torch.arange(s - 1)[None]), "position_ids",
                                     f"or (1, seq), got (1, {s - 1})"),
        "position_ids_float": (dict(position_ids=torch.arange(s).float()[None].expand(b, s)), "position_ids",
                               "expected an integer tensor, got torch.float32"),
        "position_ids_negative": (dict(position_ids=torch.arange(s)[None] - 3), "position_ids",
                                  "position -3 is outside"),
        "document_ids_wrong_shape": (dict(document_ids=torch.zeros(b, s - 2, dtype=torch.long)), "document_ids",
                                     "same as input_ids"),
        "document_ids_float": (dict(document_ids=torch.zeros(b, s)), "document_ids", "expected an integer tensor"),
        "loss_mask_wrong_shape": (dict(loss_mask=torch.ones(s)), "loss_mask", "same as input_ids"),
        "embeddings_wrong_width": (dict(modality_inputs={}, modality_embeddings={"images": torch.zeros(8, 31)}),
                                   "modality_embeddings.images", "expected shape (N, 32)"),
        "embeddings_not_2d": (dict(modality_inputs={}, modality_embeddings={"images": torch.zeros(2, 4, 32)}),
                              "modality_embeddings.images", "got (2, 4, 32)"),
        "embeddings_integer": (dict(modality_inputs={}, modality_embeddings={"images": emb.long()}),
                               "modality_embeddings.images", "floating-point embeddings"),
        "embeddings_unknown_modality": (dict(modality_embeddings={"video": emb}), "modality_embeddings.video",
                                        "unknown input modality 'video'"),
        "embeddings_and_inputs_both": (dict(modality_embeddings={"images": emb}), "modality_embeddings.images",
                                       "given both"),
        "embeddings_too_few_rows": (dict(modality_inputs={}, modality_embeddings={"images": emb[:5]}),
                                    "modality_embeddings.images",
                                    "input_ids hold 8 placeholder tokens (id 250) but 5 embeddings are given"),
        "embeddings_not_a_mapping": (dict(modality_inputs={}, modality_embeddings=[emb]), "modality_embeddings",
                                     "expected a mapping"),
        "inputs_unknown_modality": (dict(modality_inputs={"images": {"clip": {"pixel_values": px}}, "audio": {}}),
                                    "modality_inputs.audio", "unknown input modality 'audio'"),
        "inputs_too_few_items": (dict(modality_inputs={"images": {"clip": {"pixel_values": px[:1]}}}),
                                 "modality_inputs.images", "input_ids hold 8 placeholder tokens (id 250) but 4"),
        "inputs_not_a_mapping": (dict(modality_inputs=[px]), "modality_inputs", "expected a mapping"),
    }


def test_every_bad_batch_is_an_input_error_naming_the_argument(model, batch):
    """One model, one good batch, each mistake made once: the error names the argument and says what
    was expected; nothing reaches the embedding lookup or the loss."""
    cases = _bad_batches(batch)
    for name, (changes, path, message) in cases.items():
        with pytest.raises(InputError) as e:
            model(**_with(batch, **changes))
        assert str(e.value).startswith(path + ":"), (name, str(e.value))
        assert message in str(e.value), (name, str(e.value))


def test_prepare_inputs_checks_ids_and_modalities(model, batch):
    ids = batch["input_ids"].clone()
    inputs = batch["modality_inputs"]
    model.prepare_inputs(ids, inputs)  # the good batch passes
    ids[0, -1] = 999
    with pytest.raises(InputError, match=r"^input_ids: token id 999 is outside the vocabulary \[0, 256\)"):
        model.prepare_inputs(ids, inputs)
    with pytest.raises(InputError, match=r"^input_ids: expected integer token ids"):
        model.prepare_inputs(batch["input_ids"].double(), inputs)
    with pytest.raises(InputError, match=r"^modality_inputs.video: unknown input modality"):
        model.prepare_inputs(batch["input_ids"], {"video": {}})


def test_good_batches_still_run(model, batch):
    """The ignore index, (1, seq) positions, a padding mask, and precomputed embeddings in place of an
    encoder (giving the same logits) are all accepted."""
    with torch.no_grad():
        ref = model(**batch)
        assert (batch["labels"] == -100).any()
        b, s = batch["input_ids"].shape
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, -2:] = 0
        model(**batch, position_ids=torch.arange(s)[None], attention_mask=mask, loss_mask=torch.ones(b, s))
        images = model.modalities["images"]
        emb = images.encode(batch["modality_inputs"]["images"])
        via_emb = model(batch["input_ids"], modality_embeddings={"images": emb}, labels=batch["labels"])
    torch.testing.assert_close(via_emb.logits, ref.logits)
    # a model on the meta device takes meta inputs (shape tracing): no value is read
    meta = build_model(tiny_config(), device="meta")
    out = meta(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k != "modality_inputs"}, modality_embeddings={"images": emb.to("meta")})
    assert out.logits.shape == (b, s, 256) and out.logits.is_meta


def test_value_checks_stay_out_of_compiled_graphs(model, batch):
    """Value checks need a host read, so they run in eager mode only: compiled with fullgraph=True (where
    a host read would be a graph break, hence an error) they are skipped rather than breaking the graph.
    (tests/test_model.py compiles the whole forward, structural checks included, with fullgraph=True.)"""
    from mimo_spec.models.inputs import check_values

    bad = batch["input_ids"].clone()
    bad[0, 0] = 10_000
    with pytest.raises(InputError, match="token id 10000"):
        check_values(model, bad)  # eager: caught

    def step(ids):
        check_values(model, ids, labels=batch["labels"])
        return ids + 1

    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(bad), bad + 1)
