"""MimoModel: per-sample alignment, several encoders, mixed batches, output modalities, input errors."""


import pytest
import torch

from mimo_spec import build_model
from mimo_spec.errors import InputError

from conftest import tiny_config

IMG = 250


def two_encoder_config(combine="per_item"):
    cfg = tiny_config()
    mod = cfg["modalities"]["images"]
    enc_b = {"module": "clip_vit", "params": {"image_size": 16, "patch_size": 8, "hidden_size": 8, "num_layers": 1,
                                              "num_heads": 2, "ffn_hidden_size": 16, "class_token": False,
                                              "pre_norm": False}}
    mod["submodules"]["encoders"]["dino"] = enc_b
    mod["params"]["combine"] = combine
    if combine == "per_item":
        mod["submodules"]["input_projections"]["dino"] = {"module": "linear",
                                                          "params": {"in_features": 8, "out_features": 32}}
    else:
        mod["submodules"]["input_projections"] = {"merged": {"module": "mlp",
                                                             "params": {"in_features": 24, "out_features": 32}}}
    return cfg


def capture_lm_inputs(model):
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = args[0].detach().clone()

    model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def images(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_two_encoders_per_item_land_in_their_own_samples():
    model = build_model(two_encoder_config("per_item"), seed=0).eval()
    mod = model.modalities["images"]
    assert mod.tokens_per_item({"clip": {"pixel_values": images(1)}, "dino": {"pixel_values": images(1)}}) == 8
    # sample 0: two images, sample 1: none, sample 2: one image, at different offsets
    ids = torch.randint(0, 200, (3, 30), generator=torch.Generator().manual_seed(1))
    ids[0, 2:18] = IMG
    ids[2, 10:18] = IMG
    px = images(3)
    inputs = {"images": {"clip": {"pixel_values": px}, "dino": {"pixel_values": px}}}
    model.prepare_inputs(ids, inputs, items_per_sample={"images": [2, 0, 1]})
    seen = capture_lm_inputs(model)
    model(ids, inputs)
    with torch.no_grad():
        a = mod.input_projections["clip"](mod.encoders["clip"](px))   # (3, 4, 32)
        b = mod.input_projections["dino"](mod.encoders["dino"](px))   # (3, 4, 32)
        per_image = torch.cat([a, b], dim=1)                           # image i: A's tokens then B's
        text = model.language_model.embed_tokens(ids)
    got = seen["embeds"]
    torch.testing.assert_close(got[0, 2:10], per_image[0])
    torch.testing.assert_close(got[0, 10:18], per_image[1])
    torch.testing.assert_close(got[2, 10:18], per_image[2])
    torch.testing.assert_close(got[1], text[1])                        # text-only sample untouched
    keep = ids != IMG
    torch.testing.assert_close(got[keep], text[keep])


def test_concat_combine_is_channel_concatenation_before_one_projector():
    model = build_model(two_encoder_config("concat"), seed=0).eval()
    mod = model.modalities["images"]
    ids = torch.randint(0, 200, (2, 12))
    ids[0, 1:5] = IMG
    ids[1, 6:10] = IMG
    px = images(2)
    seen = capture_lm_inputs(model)
    model(ids, {"images": {"clip": {"pixel_values": px}, "dino": {"pixel_values": px}}})
    with torch.no_grad():
        feats = torch.cat([mod.encoders["clip"](px), mod.encoders["dino"](px)], dim=-1)
        want = mod.input_projections["merged"](feats)
    torch.testing.assert_close(seen["embeds"][0, 1:5], want[0])
    torch.testing.assert_close(seen["embeds"][1, 6:10], want[1])


def test_batch_without_any_item_of_a_modality():
    model = build_model(tiny_config(), seed=0)
    ids = torch.randint(0, 200, (2, 10))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)


def test_count_errors_name_modality_sample_and_counts():
    model = build_model(tiny_config(), seed=0)
    ids = torch.randint(0, 200, (2, 16))
    ids[0, 0:4] = IMG
    ids[1, 0:3] = IMG
    inputs = {"images": {"clip": {"pixel_values": images(2)}}}
    with pytest.raises(InputError, match=r"modality_inputs.images: sample 1 has 3 placeholder tokens .* not a "
                                         r"multiple of the 4 embeddings"):
        model.prepare_inputs(ids, inputs)
    ids[1, 3] = IMG
    with pytest.raises(InputError, match=r"1 of the 3 items have no placeholders"):
        model.prepare_inputs(ids, {"images": {"clip": {"pixel_values": images(3)}}})
    with pytest.raises(InputError, match=r"sample 0 has 4 placeholder tokens \(id 250\) but its items produce 8"):
        model.prepare_inputs(ids, inputs, items_per_sample={"images": [2, 0]})
    with pytest.raises(InputError, match=r"sample 1 has 4 placeholder tokens \(id 250\) but its items produce 0 emb"):
        model(ids, {"images": {"clip": {"pixel_values": images(1)}}}, check_inputs=True)
    # placeholders present but the modality's inputs missing: an error, never silent zeros
    with pytest.raises(InputError, match="sample 0 has 4 placeholder tokens .* produce 0"):
        model.prepare_inputs(ids, {})
    with pytest.raises(InputError, match=r"modality_inputs.images: input_ids hold 8 placeholder tokens \(id 250\) "
                                         r"but 0 embeddings"):
        model(ids, {})


def test_bad_modality_inputs():
    model = build_model(two_encoder_config(), seed=0)
    ids = torch.randint(0, 200, (1, 12))
    ids[0, :8] = IMG
    px = images(1)
    with pytest.raises(InputError, match="modality_inputs.images.dino: missing inputs for encoder 'dino'"):
        model(ids, {"images": {"clip": {"pixel_values": px}}})
    with pytest.raises(InputError, match="modality_inputs.video: unknown input modality 'video'"):
        model(ids, {"video": {}})
    with pytest.raises(InputError, match="modality_inputs.images.sig: unknown encoder 'sig'"):
        model(ids, {"images": {"clip": {"pixel_values": px}, "dino": {"pixel_values": px}, "sig": {}}})
    with pytest.raises(InputError, match="modality_inputs.images.clip"):
        model(ids, {"images": {"clip": {"pixel_values": px[0]}, "dino": {"pixel_values": px}}})
    with pytest.raises(InputError, match="modality_inputs.images.clip"):
        model(ids, {"images": {"clip": {"pixel_values": px[:, :1]}, "dino": {"pixel_values": px}}})
    with pytest.raises(InputError, match=r"labels: expected shape \(1, 12\)"):
        model(ids, {"images": {"clip": {"pixel_values": px}, "dino": {"pixel_values": px}}}, labels=ids[:, :5])
    with pytest.raises(InputError, match="sequence length 200 exceeds the language model's max_seq_len 128"):
        model(torch.zeros(1, 200, dtype=torch.long))


def test_forward_and_backward_compile_fullgraph_without_host_sync():
    model = build_model(tiny_config(), seed=0)
    batch = model.example_inputs(2)
    eager = model(**batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss)
    assert model.modalities["images"].encoders["clip"].patch_embed.weight.grad is not None


def test_frozen_encoder_builds_no_graph():
    cfg = tiny_config(freeze=["modalities.images.encoders.*"])
    model = build_model(cfg, seed=0)
    batch = model.example_inputs(2)
    seen = {}
    enc = model.modalities["images"].encoders["clip"]
    enc.register_forward_hook(lambda m, a, out: seen.update(grad=out.requires_grad))
    model(**batch).loss.backward()
    assert seen["grad"] is False
    assert model.modalities["images"].input_projections["clip"].layers[0].weight.grad is not None


def test_packed_rows_give_the_unpacked_loss():
    model = build_model(tiny_config(), seed=0).eval()
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 200, (10,), generator=g)
    b = torch.randint(0, 200, (7,), generator=g)
    a[2:6] = IMG
    b[1:5] = IMG
    px = images(2)
    inputs = {"images": {"clip": {"pixel_values": px}}}
    # unpacked: right-padded batch of two samples
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, :7] = a, b
    labels = ids.clone()
    labels[1, 7:] = -100
    labels[ids == IMG] = -100
    unpacked = model(ids, inputs, labels=labels)
    # packed: one row, attention kept inside each document, positions restart
    packed_ids = torch.cat([a, b])[None]
    packed_labels = torch.cat([labels[0], labels[1, :7]])[None]
    docs = torch.tensor([[0] * 10 + [1] * 7])
    packed = model(packed_ids, inputs, labels=packed_labels, document_ids=docs)
    torch.testing.assert_close(packed.loss, unpacked.loss)
    torch.testing.assert_close(packed.logits[0, 10:], unpacked.logits[1, :7])


def test_any_to_any_example_config_trains_its_output():
    from mimo_spec.config import compose_config

    model = build_model(compose_config(["modality=[vision_clip,image_gen]"]), seed=0)
    batch = model.example_inputs(2)
    assert batch["output_targets"]["image_out"].shape == (2, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        losses.append(out.modality_losses["image_out"].item())
    assert out.modality_outputs["image_out"].shape == (2, 64, 7)  # logits over the 7 palette codes
    assert losses[-1] < 0.5 * losses[0] and float(out.modality_accuracy["image_out"]) > 0.5


def test_precomputed_modality_embeddings_replace_the_encoders():
    """modality_embeddings= (features encoded elsewhere) gives the same logits, loss and LM gradients."""
    model = build_model(tiny_config(), seed=0)
    batch = model.example_inputs(batch_size=3)
    ref = model(**batch)
    ref.loss.backward()
    ref_grad = model.language_model.layers[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    emb = model.modalities["images"].encode(batch["modality_inputs"]["images"]).detach().requires_grad_()
    out = model(batch["input_ids"], modality_embeddings={"images": emb}, labels=batch["labels"])
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    torch.testing.assert_close(model.language_model.layers[0].attn.qkv.weight.grad, ref_grad)
    assert emb.grad is not None and emb.grad.abs().sum() > 0
