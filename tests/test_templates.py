"""Chat templates and placeholders: a Hugging Face tokenizer's own chat_template (with and without
{% generation %} marks), data.template, placeholder tags that are (or are not) the tokenizer's own tokens.

Every tokenizer is a byte-level BPE trained here on a few sentences (Qwen2's pre-tokenizer), saved with
save_pretrained and loaded through HFTokenizer: nothing downloads. Expected ids and labels are built by
hand from each template's layout, tokenising its pieces with the tokenizers library directly, and the
ids are also checked against transformers' own apply_chat_template.
"""

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.data.config import ChatTemplate
from mimo_spec.data.tokenizer import (HFTokenizer, Tag, build_tokenizer, encode_conversation, placeholder_modalities,
                                      reserved_token_ids, resolve_template)
from mimo_spec.errors import ConfigError, InputError

pytest.importorskip("transformers")
IGNORE = -100

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["What is in the picture? A red square on a white table.", "Describe the image in detail, please.",
          "The cat sits on the mat and looks at the camera.", "Hello there! How are you today?",
          "Compare the two images: red, then blue.", "user assistant system"] * 3
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's layout (without its default system prompt), plain and with generation marks
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_MARKED = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{%- if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- else %}"
                 "{{ m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama-3's layout: it strips every message
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def save_bpe(directory, specials, chat_template=None, extra=(), bos=None, eos="<|im_end|>", vocab_size=400):
    """A Qwen2-like byte-level BPE trained on CORPUS; ``extra``: added special tokens (placeholders)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=specials[0])
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(directory))
    return HFTokenizer(directory)


def pieces_to_expected(tok, pieces, tags):
    """Ids and labels from hand-laid pieces: (text, trained) tokenised alone by the Rust tokenizer, ("id", name)
    a special token, ("tag", text) a tag's run."""
    ids, labels, runs = [], [], []
    for what, train in pieces:
        if isinstance(what, tuple):  # ("tag", text)
            tag = tags[what[1]]
            runs.append((tag.modality, len(ids), tag.length))
            ids += [tag.token_id] * tag.length
            labels += [IGNORE] * tag.length
            continue
        toks = tok.tok.backend_tokenizer.encode(what, add_special_tokens=False).ids if what else []
        ids += toks
        labels += toks if train else [IGNORE] * len(toks)
    return ids, labels, runs


def chatml_pieces(turns, generation_prompt=False, tag=None):
    """The ChatML layout by hand: only the answer and its <|im_end|> are trained; ``tag`` is cut out."""
    out = []
    for role, text in turns:
        out.append(("<|im_start|>" + role + "\n", False))
        parts = text.split(tag) if tag else [text]
        for k, part in enumerate(parts):
            out.append((part, role == "assistant"))
            if k < len(parts) - 1:
                out.append((("tag", tag), False))
        out += [("<|im_end|>", role == "assistant"), ("\n", False)]
    if generation_prompt:
        out.append(("<|im_start|>assistant\n", False))
    return out


def hf_ids_expanded(tok, turns, tags, **kw):
    """transformers' own apply_chat_template ids, each tag id expanded to its run."""
    ids = tok.tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=True,
                                      return_dict=True, **kw)["input_ids"]
    by_id = {tok.added_vocab[t]: tag for t, tag in tags.items()}
    out = []
    for i in ids:
        out += [by_id[i].token_id] * by_id[i].length if i in by_id else [i]
    return out


TURNS = [("system", "Be brief."), ("user", "<|image_pad|>\nWhat is in the picture?"),
         ("assistant", "A red square on a white table."), ("user", "Compare the two images: red, then blue."),
         ("assistant", "assistant")]  # an answer that is also the header's text


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["plain", "generation_marks"])
def test_own_chat_template_ids_labels_runs(tmp_path, template):
    tok = save_bpe(tmp_path / "tok", CHATML_SPECIALS, template, extra=["<|image_pad|>"])
    pad = tok.added_vocab["<|image_pad|>"]
    tags = {"<|image_pad|>": Tag("images", pad, 4)}
    enc = encode_conversation(tok, TURNS, tags, where="s")
    # by hand: the tag is tokenised as the special token it is, then expanded
    pieces = chatml_pieces(TURNS, tag="<|image_pad|>")
    ids, labels, runs = pieces_to_expected(tok, pieces, tags)
    assert enc.input_ids == ids == hf_ids_expanded(tok, TURNS, tags)
    assert enc.labels == labels and enc.runs == runs == [("images", runs[0][1], 4)]
    trained = tok.decode([t for t in enc.labels if t != IGNORE], skip_special_tokens=False)
    assert trained == "A red square on a white table.<|im_end|>assistant<|im_end|>"
    if template == CHATML_MARKED:  # the same tokens transformers' generation mask marks
        out = tok.tok.apply_chat_template([{"role": r, "content": c} for r, c in TURNS], tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True)
        mask = [m for i, m in zip(out["input_ids"], out["assistant_masks"]) for _ in range(4 if i == pad else 1)]
        assert [int(t != IGNORE) for t in enc.labels] == mask
    # the generation prompt: the conversation so far, then the assistant header, nothing trained
    gen = encode_conversation(tok, TURNS[:2], tags, add_generation_prompt=True, where="prompt")
    ids, _, _ = pieces_to_expected(tok, chatml_pieces(TURNS[:2], True, tag="<|image_pad|>"), tags)
    assert gen.input_ids == ids == hf_ids_expanded(tok, TURNS[:2], tags, add_generation_prompt=True)
    assert set(gen.labels) == {IGNORE} and tok.decode(gen.input_ids, skip_special_tokens=False).endswith(
        "the picture?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["plain", "generation_marks"])
def test_tags_that_are_not_tokens_never_merge(tmp_path, template):
    tok = save_bpe(tmp_path / "tok", CHATML_SPECIALS, template)
    tags = {"<image>": Tag("images", 300, 3), "<audio>": Tag("audio", 301, 2)}
    turns = [("user", "look<image>here<audio>, then<image>"), ("assistant", "The cat<image>sits.")]
    enc = encode_conversation(tok, turns, tags, where="s")
    pieces = []
    for role, text in turns:  # the ChatML layout with both tags cut out
        pieces.append(("<|im_start|>" + role + "\n", False))
        for k, part in enumerate(text.replace("<audio>", "\0<audio>\0").replace("<image>", "\0<image>\0").split("\0")):
            pieces.append((("tag", part), False) if part in tags else (part, role == "assistant"))
        pieces += [("<|im_end|>", role == "assistant"), ("\n", False)]
    ids, labels, runs = pieces_to_expected(tok, pieces, tags)
    assert (enc.input_ids, enc.labels, enc.runs) == (ids, labels, runs)
    assert [m for m, _, _ in enc.runs] == ["images", "audio", "images", "images"]
    for modality, start, length in enc.runs:  # the runs sit where they say, untrained
        tag_id = 300 if modality == "images" else 301
        assert enc.input_ids[start:start + length] == [tag_id] * length
        assert enc.labels[start:start + length] == [IGNORE] * length
    assert tok.decode([t for t in enc.labels if t != IGNORE], skip_special_tokens=False) == "The catsits.<|im_end|>"


def test_llama3_layout_strips_text_and_trains_eot(tmp_path):
    tok = save_bpe(tmp_path / "tok", LLAMA3_SPECIALS + ["<|endoftext|>"], LLAMA3, extra=["<image>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>")
    tags = {"<image>": Tag("images", tok.added_vocab["<image>"], 3)}
    turns = [("system", " Be brief. "), ("user", "<image>\nWhat is in the picture?"), ("assistant", " A red square.\n"),
             ("user", "Hello"), ("assistant", "assistant")]
    enc = encode_conversation(tok, turns, tags, where="s")
    pieces = [("<|begin_of_text|>", False)]
    for role, text in turns:
        pieces += [("<|start_header_id|>" + role + "<|end_header_id|>\n\n", False)]
        parts = text.strip().split("<image>")
        for k, part in enumerate(parts):
            pieces.append((part, role == "assistant"))
            if k < len(parts) - 1:
                pieces.append((("tag", "<image>"), False))
        pieces.append(("<|eot_id|>", role == "assistant"))
    ids, labels, runs = pieces_to_expected(tok, pieces, tags)
    assert enc.input_ids == ids == hf_ids_expanded(tok, turns, tags)
    assert (enc.labels, enc.runs) == (labels, runs)
    assert tok.decode([t for t in enc.labels if t != IGNORE], skip_special_tokens=False) == \
        "A red square.<|eot_id|>assistant<|eot_id|>"
    # a tokenizer without offsets (a slow one) cuts the text at the answers instead: here the same result
    slow = HFTokenizer(tmp_path / "tok")
    slow.backend = None
    got = encode_conversation(slow, turns, tags, where="s")
    assert (got.input_ids, got.labels, got.runs) == (ids, labels, runs)


# Llama-3's layout with generation marks around each answer (content|trim + <|eot_id|>): transformers' own mask
LLAMA3_MARKED = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
                 "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}"
                 "{% endgeneration %}{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_trimming_template_labels_equal_transformers_assistant_mask_with_odd_whitespace(tmp_path):
    """A template that trims every message (Llama 3's): messages padded with whitespace, a user turn whose text
    recurs later, answers that are whitespace only or empty. The labels equal transformers' assistant-token mask
    of the same layout with generation marks (a padded user turn made valid samples unusable; a whitespace-only
    answer trained the next header's newlines instead of its <|eot_id|>)."""
    import random

    tok = save_bpe(tmp_path / "tok", LLAMA3_SPECIALS + ["<|endoftext|>"], LLAMA3, bos="<|begin_of_text|>",
                   eos="<|eot_id|>")
    marked = save_bpe(tmp_path / "marked", LLAMA3_SPECIALS + ["<|endoftext|>"], LLAMA3_MARKED,
                      bos="<|begin_of_text|>", eos="<|eot_id|>")

    def reference(turns):
        out = marked.tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [i if m else IGNORE for i, m in zip(out["input_ids"], out["assistant_masks"])]

    cases = [[("user", "Describe it. "), ("assistant", "A dog on grass."), ("user", "Describe it. Then the colours."),
              ("assistant", "Green and brown.")],
             [("user", "Is it red? "), ("assistant", "Yes"), ("user", "Is it red? Yes or no?"), ("assistant", "Yes")],
             [("user", "Hi"), ("assistant", "\n"), ("user", "What is it?"), ("assistant", "A cat.")],
             [("system", "  Be brief.\n"), ("user", " Hello "), ("assistant", ""), ("user", "again"),
              ("assistant", " \tThe cat sits. ")]]
    rng = random.Random(0)
    words = ["the", "cat", "red", "Hello", "picture", "?", "today", "assistant"]
    pads = ["", " ", "  ", "\n", " \n"]
    for _ in range(60):
        turns = [("system", rng.choice(pads) + "You are helpful." + rng.choice(pads))] if rng.random() < 0.3 else []
        for k in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))
                turns.append((role, rng.choice(pads) + text + rng.choice(pads)))
        cases.append(turns)
    for turns in cases:
        enc = encode_conversation(tok, turns, {}, where="s")
        ids, labels = reference(turns)
        assert (enc.input_ids, enc.labels) == (ids, labels), turns


def test_explicit_template_wins_and_what_is_chosen(tmp_path):
    tok = save_bpe(tmp_path / "tok", CHATML_SPECIALS, CHATML)
    plain = save_bpe(tmp_path / "plain", CHATML_SPECIALS)  # no chat template of its own
    assert resolve_template(None, tok) == CHATML and resolve_template(None, plain) == ChatTemplate()
    mine = ChatTemplate(user_prefix="Q: ", user_suffix="\n", assistant_prefix="A: ")
    assert resolve_template(mine, tok) is mine
    turns = [("user", "Hello there!"), ("assistant", "How are you?")]
    for t in (tok, plain):
        enc = encode_conversation(t, turns, {}, mine, where="s")
        assert t.decode(enc.input_ids, skip_special_tokens=False) == "Q: Hello there!\nA: How are you?<|im_end|>"
        assert t.decode([i for i in enc.labels if i != IGNORE], skip_special_tokens=False) == "How are you?<|im_end|>"
    enc = encode_conversation(plain, turns, {}, where="s")  # LLaVA-1.5's layout
    assert plain.decode(enc.input_ids, skip_special_tokens=False) == \
        "USER: Hello there! ASSISTANT: How are you?<|im_end|>"


def test_a_template_without_end_of_turn_tokens_trains_the_answers_only(tmp_path):
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    tok = save_bpe(tmp_path / "tok", CHATML_SPECIALS, template)
    turns = [("user", "Hello there!"), ("assistant", "The cat sits."), ("user", "How?"), ("assistant", "Red.")]
    enc = encode_conversation(tok, turns, {}, where="s")
    text, spans = "", []  # by hand: the answers' characters; a token is trained when it overlaps one
    for role, t in turns:
        text += f"{role}: "
        spans += [(len(text), len(text) + len(t))] if role == "assistant" else []
        text += t + "\n"
    whole = tok.tok.backend_tokenizer.encode(text, add_special_tokens=False)
    labels = [i if any(a < e and s < b for s, e in spans) else IGNORE for i, (a, b) in zip(whole.ids, whole.offsets)]
    assert enc.input_ids == whole.ids == hf_ids_expanded(tok, turns, {}) and enc.labels == labels
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == "The cat sits.Red."


def test_template_problems_name_the_sample(tmp_path):
    drops = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}"
    refuses = "{{ raise_exception('Conversation roles must alternate') }}"
    turns = [("user", "Hello"), ("assistant", "red")]
    for template, message in ((drops, r"s3: the tokenizer's chat template does not show assistant message 1"),
                              (refuses, r"s3: the tokenizer's chat template refuses this conversation: Conversation")):
        tok = save_bpe(tmp_path / str(len(template)), CHATML_SPECIALS, template)
        with pytest.raises(InputError, match=message):
            encode_conversation(tok, turns, {}, where="s3")
    with pytest.raises(InputError, match=r"s3: unknown role 'bot'"):
        encode_conversation(tok, [("bot", "x")], {}, where="s3")
    for template in (CHATML, CHATML_MARKED):  # not text: UnicodeEncodeError, as the byte tokenizer says
        tok = save_bpe(tmp_path / str(len(template)), CHATML_SPECIALS, template)
        with pytest.raises(UnicodeEncodeError):
            encode_conversation(tok, [("user", "a\ud800"), ("assistant", "b")], {}, where="s3")


@pytest.fixture(scope="module")
def placeholder_dir(tmp_path_factory):
    """A ChatML tokenizer whose own <image> token is id 377."""
    d = tmp_path_factory.mktemp("ph")
    tok = save_bpe(d, CHATML_SPECIALS, CHATML, extra=["<image>"])
    assert tok.added_vocab["<image>"] == 377
    return d


def test_tokenizers_own_placeholder_token(placeholder_dir):
    cfg = {"source": "synthetic", "tokenizer": str(placeholder_dir)}
    vlm = build_model(compose_config([]), seed=0)  # images' special_token_id: 1000
    with pytest.raises(ConfigError) as e:
        build_tokenizer(cfg, vlm)
    assert ("data.image_token: '<image>' is the tokenizer's own token 377, but "
            "modalities.images.params.special_token_id is 1000") in str(e.value)
    assert "set modalities.images.params.special_token_id=377" in str(e.value)
    model = build_model(compose_config(["modalities.images.params.special_token_id=377"]), seed=0)
    tok = build_tokenizer(cfg, model)  # the tokenizer's own id is the placeholder: legitimate
    assert placeholder_modalities(cfg, model) == {"<image>": "images"}
    tags = {"<image>": Tag("images", 377, 16)}
    reserved = set(reserved_token_ids(model))
    enc = encode_conversation(tok, [("user", "<image>\nWhat is in the picture?"), ("assistant", "A red square.")],
                              tags, reserved=reserved, where="s")
    assert enc.runs == [("images", 3, 16)] and enc.input_ids.count(377) == 16
    model.prepare_inputs(torch.tensor([enc.input_ids]), {"images": model.modalities["images"].example_inputs(1)})
    # ordinary text that tokenises to a placeholder id is still refused, naming the sample
    word = tok.encode(" cat")
    assert len(word) == 1
    clash = build_model(compose_config([f"modalities.images.params.special_token_id={word[0]}"]), seed=0)
    with pytest.raises(InputError, match=rf"data.json: sample 7: text ' cat' tokenises to id {word[0]}, a modality's "):
        encode_conversation(tok, [("user", "The cat"), ("assistant", "sits.")], tags,
                            reserved=set(reserved_token_ids(clash)), where="data.json: sample 7")
    # a placeholder id that is the tokenizer's own eos: every answer would hold it
    eos = build_model(compose_config([f"modalities.images.params.special_token_id={tok.eos_id}"]), seed=0)
    with pytest.raises(ConfigError, match=r"data.tokenizer: the tokenizer's eos token '<\|im_end\|>' is id 2, which "
                                          r"is also modalities.images.params.special_token_id"):
        build_tokenizer({**cfg, "image_token": "<img>"}, eos)


def test_generation_stops_at_the_templates_end_of_turn_token(tmp_path):
    """A model fine-tuned with ChatML learns to end answers with <|im_end|>, not the tokenizer's eos: both stop
    generation; a layout whose answers end with eos (the byte tokenizer's) stops at eos only."""
    from mimo_spec.data.tokenizer import ByteTokenizer, stop_token_ids

    tok = save_bpe(tmp_path / "tok", CHATML_SPECIALS, CHATML, eos="<|endoftext|>")
    im_end = tok.added_vocab["<|im_end|>"]
    assert tok.eos_id == tok.added_vocab["<|endoftext|>"] != im_end
    assert stop_token_ids(tok) == [tok.eos_id, im_end]
    assert stop_token_ids(tok, ChatTemplate()) == [tok.eos_id]  # LLaVA's layout trains eos after each answer
    byte = ByteTokenizer()
    assert stop_token_ids(byte) == [byte.eos_id]
    # generate() stops at any of them: a model whose first greedy token is <|im_end|> stops after it
    model = build_model(compose_config([]), seed=0)
    from mimo_spec.generation import generate

    ids = torch.tensor([[1, 2, 3]])
    full = generate(model, ids, max_new_tokens=5).tokens
    other = next(t for t in range(256) if t not in full)
    assert generate(model, ids, max_new_tokens=5, eos_id=[other, full[1]]).tokens == full[:full.index(full[1]) + 1]
    assert generate(model, ids, max_new_tokens=5, eos_id=other).tokens == full
