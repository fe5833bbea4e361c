"""sequences.py: text -> the ids the trainer fed the model, checked against TRL's own tokenization functions."""

from __future__ import annotations

import json

import pytest

from ckptforce.errors import ProbeFileError, TokenizerError
from ckptforce.probes import boundary_note, load_probe_set, make_batch, tokenize
from ckptforce.sequences import (
    Convention, as_text, common_prefix_length, consistency_notes, describe, encode, encode_language_modeling, files_sha256,
    load_chat_template,
)  # fmt: skip
from fixtures.llm_runs import CHAT_TEMPLATE, bos_tokenizer


@pytest.fixture(scope="module")
def tok():
    return bos_tokenizer()


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A BPE without a pre-tokenizer: merges cross word boundaries, so 'A:' + ' Alice' tokenizes differently whole."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(BPE())
    t.train_from_iterator(["A: Alice lives in Paris."] * 50, BpeTrainer(vocab_size=120, special_tokens=["<bos>", "<eos>"], show_progress=False))
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", t.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>")


def _trl_sft(tokenizer, row):
    """TRL's SFT tokenization of one prompt/completion row (its own functions), as (prompt ids, completion ids)."""
    from trl.data_utils import _tokenize, common_prefix_length as trl_prefix, is_conversational

    kw = {"add_generation_prompt": True} if is_conversational(row) else {}
    prompt = _tokenize(tokenizer, row["prompt"], **kw)["input_ids"]
    full = _tokenize(tokenizer, row["prompt"] + row["completion"])["input_ids"]
    n = trl_prefix(prompt, full)
    return full[:n], full[n:]


@pytest.mark.parametrize("row", [
    {"prompt": "Q: Where does alice live?\nA:", "completion": " Alice lives in Paris.<eos>"},
    {"prompt": "Q: Where does bob live?\nA: Bo", "completion": "b lives in Rome.<eos>"},  # a merge across the boundary
    {"prompt": [{"role": "user", "content": "Where does alice live?"}], "completion": [{"role": "assistant", "content": "Paris."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "completion": [{"role": "assistant", "content": "Hello."}]},
])  # fmt: skip
def test_encode_is_trls_sft_tokenization(tok, row):
    enc = encode(tok, row["prompt"], {"completion": row["completion"]})
    assert (enc.prompt_ids, enc.response_ids["completion"]) == _trl_sft(tok, row)
    assert enc.prompt_ids[0] == tok.bos_token_id


def test_a_merge_across_the_boundary_cuts_the_prompt_as_trl_does(merging_tokenizer):
    t = merging_tokenizer
    row = {"prompt": "A: Ali", "completion": "ce lives in Paris."}
    enc = encode(t, row["prompt"], {"completion": row["completion"]})
    assert (enc.prompt_ids, enc.response_ids["completion"]) == _trl_sft(t, row)
    assert enc.prompt_cut, "the prompt's last token merged with the completion's first"
    whole = t(row["prompt"] + row["completion"])["input_ids"]
    separately = t(row["prompt"])["input_ids"] + t(row["completion"], add_special_tokens=False)["input_ids"]
    assert whole != separately  # what the old tokenization (two halves) would have scored
    assert enc.prompt_ids + enc.response_ids["completion"] == whole


def test_eos_is_appended_once_and_only_when_asked(tok):
    eos = tok.eos_token_id
    off = encode(tok, "Q: x\nA:", {"r": " Paris."}).response_ids["r"]
    on = encode(tok, "Q: x\nA:", {"r": " Paris."}, Convention(eos=True)).response_ids["r"]
    already = encode(tok, "Q: x\nA:", {"r": " Paris.<eos>"}, Convention(eos=True)).response_ids["r"]
    assert on == off + [eos] == already and eos not in off


def test_dpo_prompt_is_the_shortest_common_prefix(merging_tokenizer):
    """TRL's DPO: one prompt for chosen and rejected, cut where either diverges from it."""
    t = merging_tokenizer
    enc = encode(t, "A: Ali", {"chosen": "ce lives in Paris.", "rejected": " in Paris."})
    fulls = {k: t("A: Ali" + v)["input_ids"] for k, v in {"chosen": "ce lives in Paris.", "rejected": " in Paris."}.items()}
    n = min(common_prefix_length(t("A: Ali")["input_ids"], f) for f in fulls.values())
    assert enc.prompt_ids == fulls["chosen"][:n] == fulls["rejected"][:n]
    assert all(enc.prompt_ids + enc.response_ids[k] == fulls[k] for k in fulls)


def test_ids_are_used_as_given_and_text_after_ids_has_no_special_tokens(tok):
    enc = encode(tok, [2, 7, 9], {"a": [5, 6], "b": " Paris"})
    assert enc.prompt_ids == [2, 7, 9] and enc.response_ids["a"] == [5, 6]
    assert enc.response_ids["b"] == tok(" Paris", add_special_tokens=False)["input_ids"]
    mixed = encode(tok, "Q: x\nA:", {"a": [5, 6], "b": " Paris"})
    assert mixed.prompt_ids == tok("Q: x\nA:")["input_ids"] and mixed.response_ids["a"] == [5, 6]


def test_no_special_tokens_drops_the_bos(tok):
    enc = encode(tok, "Q: x\nA:", {"r": " Paris"}, Convention(special_tokens=False))
    assert enc.prompt_ids[0] != tok.bos_token_id
    assert enc.prompt_ids == tok("Q: x\nA:", add_special_tokens=False)["input_ids"]


def test_a_text_response_in_a_conversation_is_one_assistant_turn(tok):
    prompt = [{"role": "user", "content": "Where?"}]
    as_text_turn = encode(tok, prompt, {"r": "Paris."})
    as_messages = encode(tok, prompt, {"r": [{"role": "assistant", "content": "Paris."}]})
    assert as_text_turn == as_messages
    rendered = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    assert tok.decode(as_messages.prompt_ids + as_messages.response_ids["r"]) == rendered


def test_language_modeling_rows_train_every_token_after_the_first(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    enc = encode_language_modeling(tok, messages)
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert enc.prompt_ids == full[:1] == [tok.bos_token_id] and enc.response_ids["completion"] == full[1:]
    text = encode_language_modeling(tok, "alice lives in paris.", Convention(eos=True))
    assert text.prompt_ids + text.response_ids["completion"] == tok("alice lives in paris.<eos>")["input_ids"]


def test_chat_template_override_and_errors(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>")
    prompt = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TokenizerError, match="no chat template; pass --chat-template FILE"):
        encode(plain, prompt, {"r": "Hello."}, where="p.jsonl:3")
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHAT_TEMPLATE)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    assert load_chat_template(jinja) == load_chat_template(cfg) == CHAT_TEMPLATE
    assert encode(plain, prompt, {"r": "Hello."}, Convention(chat_template=CHAT_TEMPLATE)) == encode(tok, prompt, {"r": "Hello."})
    with pytest.raises(TokenizerError, match="cannot render this row"):
        encode(tok, prompt, {"r": "x"}, Convention(chat_template="{{ messages[0].nope() }}"), where="p.jsonl:3")
    with pytest.raises(ProbeFileError, match="a message must be"):
        encode(tok, [{"role": "robot", "content": "x"}], {"r": "y"})
    with pytest.raises(ProbeFileError, match="needs a conversational prompt"):
        encode(tok, "Q: text", {"r": [{"role": "assistant", "content": "y"}]})
    for bad, what in ((tmp_path / "missing.jinja", "no such file"), (tmp_path / "empty.jinja", "is empty")):
        if what == "is empty":
            bad.write_text("  ")
        with pytest.raises(TokenizerError, match=what):
            load_chat_template(bad)


def test_describe_records_the_convention(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    d = describe(saved, probe=Convention(), train=Convention(eos=True), template_source="the tokenizer's")
    assert d["bos_added"] is True and d["probe_eos"] is False and d["train_eos"] is True
    assert d["tokenizer_sha256"] == files_sha256(tmp_path) != "" and len(d["chat_template_sha256"]) == 64
    assert describe(saved, probe=Convention(special_tokens=False), train=None, template_source="")["bos_added"] is False


def test_consistency_notes(tok):
    notes = consistency_notes(tok, probe=Convention(), probe_kinds={"text"}, train=Convention(eos=True), train_kinds={"messages"})
    assert any("probes are plain text but the training examples are conversations" in n for n in notes)
    assert any("--probe-eos" in n for n in notes)
    assert any("--no-special-tokens" in n for n in consistency_notes(tok, probe=Convention(special_tokens=False), probe_kinds={"ids"}))
    assert any("chat template but the probes are plain text" in n for n in consistency_notes(tok, probe=Convention(), probe_kinds={"text"}))
    assert consistency_notes(tok, probe=Convention(), probe_kinds={"messages"}, train=Convention(eos=True), train_kinds={"messages"}) == []


def test_conversational_probe_file_round_trip(tok, tmp_path):
    f = tmp_path / "probes.jsonl"
    rows = [
        {"id": "c1", "prompt": [{"role": "user", "content": "Where does alice live?"}],
         "responses": {"chosen": [{"role": "assistant", "content": "Paris."}], "rejected": "Rome."}},
        {"id": "t1", "prompt": "Q: Where does alice live?\nA:", "responses": {"chosen": " Paris.", "random": [5, 6, 7]}},
    ]  # fmt: skip
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_probe_set(f)
    t = tokenize(ps, tok)
    assert t.prompt_ids[0][0] == t.prompt_ids[1][0] == tok.bos_token_id
    assert as_text(ps.probes[0].prompt) == "user: Where does alice live?"
    batch = make_batch(t)
    assert len(batch) == 4 and boundary_note(t, tok) is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": [{"role": "user"}], "responses": {"chosen": "y"}}) + "\n")
    with pytest.raises(ProbeFileError, match=r"bad.jsonl:1: prompt\[0\]: 'content' missing; write each chat message as"):
        load_probe_set(bad)


def test_the_readmes_example_chat_probe_file_loads_and_tokenizes(tok):
    from pathlib import Path

    ps = load_probe_set(Path(__file__).resolve().parent.parent / "docs" / "examples" / "chat_probes.jsonl")
    t = tokenize(ps, tok)
    assert [p.id for p in ps.probes] == ["c1", "c2"] and all(ids[0] == tok.bos_token_id for ids in t.prompt_ids)
    assert set(t.response_ids[0]) == {"chosen", "rejected", "other_trained", "random"}
