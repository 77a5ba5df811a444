"""Instruction (question -> answer) tasks for causal LMs: ``medquad``, ``dolly``,
``chatterbot-qa`` and the generic ``instruction`` (any table with question/answer columns).

Examples are ``{"question": str, "answer": str, "category": str}``. ``collate`` builds
``prompt + answer + eos``, with labels ``-100`` on every prompt and padding token so that the
loss covers answer tokens (and the eos) only.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..models import ensure_pad_token  # one implementation, shared with model loading
from . import metrics
from .base import (
    DataError,
    Task,
    TaskData,
    batches,
    eval_mode,
    finish_splits,
    model_device,
    pick_schema,
    read_splits,
    register_task,
    require_path,
    safe_exp,
    to_device,
)


logger = logging.getLogger("fastseq.data")

AUTHORS_PROMPT = "### INSTRUCTION\nAnswer the Question\n\n### QUESTION\n{question}\n\n### ANSWER\n"
PROMPT_FORMATS = ("authors", "chat")


def _eos_token(tokenizer: Any) -> tuple[str | None, int | None]:
    for attr in ("eos_token", "sep_token"):
        tok = getattr(tokenizer, attr, None)
        if tok is not None:
            return tok, tokenizer.convert_tokens_to_ids(tok)
    return None, None


class InstructionTask(Task):
    """A question -> answer causal-LM task (see docs/tasks.md).

    Options: ``prompt_format`` (``"authors"`` or ``"chat"``), ``max_length`` (512),
    ``generate`` (False: also report generated ROUGE-L/BLEU in ``evaluate``),
    ``max_new_tokens`` (64), ``eval_generate_examples`` (cap on examples generated for, None =
    all)."""

    kind = "causal-lm"
    metric_for_selection = "eval_loss"
    greater_is_better = False
    default_source: str | None = None
    schemas: Sequence[dict[str, str]] = ({"question": "question", "answer": "answer"},)

    def __init__(self, prompt_format: str = "authors", max_length: int = 512, generate: bool = False,
                 max_new_tokens: int = 64, eval_generate_examples: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        if prompt_format not in PROMPT_FORMATS:
            raise DataError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")
        if max_length < 8:
            raise DataError(f"max_length must be >= 8, got {max_length}.")
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        self.prompt_format = prompt_format
        self.max_length = max_length
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.eval_generate_examples = eval_generate_examples

    # -- loading -------------------------------------------------------------------------
    def row_to_example(self, row: dict, schema: dict[str, str]) -> dict:
        cat = row.get(schema["category"]) if "category" in schema else None
        return {"question": str(row[schema["question"]] or "").strip(),
                "answer": str(row[schema["answer"]] or "").strip(),
                "category": str(cat).strip() if cat not in (None, "") else "unknown"}

    def _convert(self, rows: list[dict], source: str) -> tuple[list[dict], int]:
        schema = pick_schema(rows, self.schemas, source)
        examples = [self.row_to_example(r, schema) for r in rows]
        kept = [e for e in examples if e["answer"] and e["question"]]
        return kept, len(examples) - len(kept)

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        source = self.default_source if data_path is None else str(data_path)
        if source is None:
            raise DataError(f"task {self.name!r} needs data_path= a csv/json/jsonl/parquet file or hub id.")
        train_rows, test_rows = read_splits(source)
        train, dropped = self._convert(train_rows, source)
        test = None
        if test_rows is not None:
            test, dropped_test = self._convert(test_rows, f"{source} (test)")
            dropped += dropped_test
        if dropped:
            logger.info("%s: dropped %d rows with an empty question or answer.", source, dropped)
        train, test = finish_splits(train, test, seed, max_examples, source)
        return TaskData(train, test, [e["category"] for e in train], None,
                        {"source": source, "dropped_empty": dropped},
                        test_partition_keys=[e["category"] for e in test])

    # -- formatting ----------------------------------------------------------------------
    def prompt_text(self, question: str, tokenizer: Any) -> str:
        if self.prompt_format == "authors":
            return AUTHORS_PROMPT.format(question=question)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt_format='chat' needs a tokenizer with a chat template; this one has none. "
                            "Use prompt_format='authors' or set tokenizer.chat_template.")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)

    def answer_text(self, example: dict, prompt: str, tokenizer: Any) -> str:
        """The answer as it follows the prompt: the bare answer for the authors' format; for the
        chat format, the rest of the rendered conversation (the answer plus the template's
        end-of-turn markup) when the template renders the prompt as a prefix of it."""
        if self.prompt_format == "chat":
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": example["question"]},
                 {"role": "assistant", "content": example["answer"]}], tokenize=False)
            if isinstance(full, str) and full.startswith(prompt) and example["answer"] in full[len(prompt):]:
                return full[len(prompt):].rstrip()
        return example["answer"]

    def encode(self, example: dict, tokenizer: Any, with_answer: bool = True) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of the answer (answer + eos, or the chat template's
        end-of-turn markup followed by eos when it is not already the last token). The prompt of the
        ``authors`` format gets the tokenizer's special prefix (e.g. BOS); the chat template
        supplies its own. When prompt + answer exceed ``max_length``, the answer is cut from
        the right; a prompt longer than ``max_length - min(len(answer), max_length // 4)`` keeps
        its first token and its tail, so that the answer header stays next to the answer."""
        prompt = self.prompt_text(example["question"], tokenizer)
        p_ids = list(tokenizer(prompt, add_special_tokens=self.prompt_format == "authors")["input_ids"])
        if self.prompt_format == "authors":
            # drop a trailing special token (e.g. BERT's [SEP]) that would split prompt from answer
            sep = getattr(tokenizer, "sep_token_id", None)
            if sep is not None and p_ids and p_ids[-1] == sep and sep != getattr(tokenizer, "bos_token_id", None):
                p_ids = p_ids[:-1]
        if not with_answer:
            return p_ids[-self.max_length:], []
        _, eos_id = _eos_token(tokenizer)
        a_ids = list(tokenizer(self.answer_text(example, prompt, tokenizer), add_special_tokens=False)["input_ids"])
        if eos_id is not None and (not a_ids or a_ids[-1] != eos_id):
            a_ids.append(eos_id)
        budget = self.max_length
        min_answer = min(len(a_ids), max(1, budget // 4))
        if len(p_ids) > budget - min_answer:
            keep = budget - min_answer
            p_ids = p_ids[:1] + p_ids[len(p_ids) - (keep - 1):] if keep > 1 else p_ids[:keep]
        a_ids = a_ids[:budget - len(p_ids)]
        return p_ids, a_ids

    # -- batches -------------------------------------------------------------------------
    def collate(self, examples: Sequence[dict], processor: Any) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and
        padding)."""
        if not examples:
            raise DataError("collate() got an empty list of examples.")
        if processor is None:
            raise DataError(f"task {self.name!r} needs a tokenizer as processor (got None).")
        tok = ensure_pad_token(processor)
        seqs = [self.encode(e, tok) for e in examples]
        longest = max(len(p) + len(a) for p, a in seqs)
        n = len(examples)
        ids = torch.full((n, longest), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(n, longest, dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        for i, (p, a) in enumerate(seqs):
            full = p + a
            ids[i, :len(full)] = torch.tensor(full, dtype=torch.long)
            mask[i, :len(full)] = 1
            if a:
                labels[i, len(p):len(full)] = torch.tensor(a, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @staticmethod
    def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits if hasattr(out, "logits") else out[0]
        shift_logits = logits[:, :-1, :].float()
        shift_labels = batch["labels"][:, 1:].to(logits.device)
        losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view_as(shift_labels)
        return losses, shift_labels != -100, shift_logits

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens (labels != -100) of the batch."""
        losses, valid, _ = self._token_losses(model, batch)
        count = valid.sum()
        if count == 0:
            return losses.sum() * 0.0
        return (losses * valid).sum() / count

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, examples: Sequence[dict], processor: Any,
                 batch_size: int = 16, generate: bool | None = None) -> dict[str, float]:
        """``eval_loss`` (token-weighted mean over answer tokens), ``perplexity`` =
        exp(eval_loss), teacher-forced ``rougeL_tf``/``bleu_tf`` (argmax of the logits at each
        answer position vs the reference answer tokens) and, when generation is on, greedy
        ``rougeL_gen``/``bleu_gen`` (``max_new_tokens`` new tokens)."""
        if not examples:
            raise DataError("evaluate() got no examples; pass a non-empty test split.")
        tok = ensure_pad_token(processor)
        device = model_device(model)
        total_loss, total_tokens = 0.0, 0
        tf_preds, refs = [], []
        with eval_mode(model):
            for chunk in batches(examples, batch_size):
                batch = to_device(self.collate(chunk, tok), device)
                losses, valid, logits = self._token_losses(model, batch)
                total_loss += (losses * valid).sum().item()
                total_tokens += int(valid.sum().item())
                argmax = logits.argmax(-1)
                shift_labels = batch["labels"][:, 1:]
                for i in range(argmax.size(0)):
                    sel = valid[i]
                    tf_preds.append(tok.decode(argmax[i][sel].tolist(), skip_special_tokens=True).strip())
                    refs.append(tok.decode(shift_labels[i][sel].tolist(), skip_special_tokens=True).strip())
        eval_loss = total_loss / max(1, total_tokens)
        result = {
            "eval_loss": eval_loss,
            "perplexity": safe_exp(eval_loss),
            "rougeL_tf": metrics.rouge_l_f1(tf_preds, refs),
            "bleu_tf": metrics.corpus_bleu([p.split() for p in tf_preds], [r.split() for r in refs]),
            "num_examples": float(len(examples)),
            "num_tokens": float(total_tokens),
        }
        if self.generate if generate is None else generate:
            subset = list(examples) if self.eval_generate_examples is None else list(examples)[:self.eval_generate_examples]
            gen = self.generate_answers(model, subset, tok, batch_size)
            gold = [e["answer"] for e in subset]
            result["rougeL_gen"] = metrics.rouge_l_f1(gen, gold)
            result["bleu_gen"] = metrics.corpus_bleu([g.split() for g in gen], [r.split() for r in gold])
        return result

    def generate_answers(self, model: torch.nn.Module, examples: Sequence[dict], processor: Any,
                         batch_size: int = 16) -> list[str]:
        """Greedy answers (at most ``max_new_tokens`` tokens) to the prompts, left-padded."""
        tok = ensure_pad_token(processor)
        device = model_device(model)
        _, eos_id = _eos_token(tok)
        answers: list[str] = []
        with eval_mode(model):
            for chunk in batches(examples, batch_size):
                prompts = [self.encode(e, tok, with_answer=False)[0] for e in chunk]
                longest = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), longest), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros(len(prompts), longest, dtype=torch.long)
                for i, p in enumerate(prompts):
                    ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[i, longest - len(p):] = 1
                ids, mask = ids.to(device), mask.to(device)
                if hasattr(model, "generate"):
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos_id)
                    new = out[:, longest:]
                else:
                    new = self._greedy(model, ids, mask, eos_id)
                for row in new.tolist():
                    if eos_id is not None and eos_id in row:
                        row = row[:row.index(eos_id)]
                    answers.append(tok.decode(row, skip_special_tokens=True).strip())
        return answers

    def _greedy(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, eos_id: int | None) -> torch.Tensor:
        start = ids.size(1)
        done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
        for _ in range(self.max_new_tokens):
            out = model(input_ids=ids, attention_mask=mask)
            logits = out.logits if hasattr(out, "logits") else out[0]
            nxt = logits[:, -1, :].argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if bool(done.all()):
                break
        return ids[:, start:]


@register_task("instruction")
class GenericInstructionTask(InstructionTask):
    """Any table / hub dataset with ``question`` and ``answer`` columns (optional ``category``)."""

    name = "instruction"
    schemas = ({"question": "question", "answer": "answer", "category": "category"},
               {"question": "question", "answer": "answer"})


@register_task("medquad")
class MedQuADTask(InstructionTask):
    """MedQuAD medical Q/A. Default source: hub ``lavita/MedQuAD``. Both column schemas are
    read: question/answer/question_type (lavita) and Question/Answer/qtype (keivalya).
    Rows with an empty answer are dropped. Partition key: the question type."""

    name = "medquad"
    default_source = "lavita/MedQuAD"
    schemas = ({"question": "question", "answer": "answer", "category": "question_type"},
               {"question": "Question", "answer": "Answer", "category": "qtype"})


@register_task("dolly")
class DollyTask(InstructionTask):
    """databricks-dolly-15k. The context, when present, is folded into the question as
    ``{instruction}\\n\\nContext:\\n{context}``. Partition key: the category."""

    name = "dolly"
    default_source = "databricks/databricks-dolly-15k"
    schemas = ({"question": "instruction", "answer": "response", "category": "category", "context": "context"},
               {"question": "instruction", "answer": "response", "category": "category"})

    def row_to_example(self, row: dict, schema: dict[str, str]) -> dict:
        ex = super().row_to_example(row, schema)
        context = str(row.get("context") or "").strip()
        if context:
            ex["question"] = f"{ex['question']}\n\nContext:\n{context}"
        return ex


def _default_chatterbot_path() -> str:
    try:
        import chatterbot_corpus  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            "chatterbot-qa reads the chatterbot-corpus package by default: `pip install chatterbot-corpus`, "
            "or pass data_path= a folder of chatterbot YAML files."
        ) from e
    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")


@register_task("chatterbot-qa")
class ChatterbotQATask(InstructionTask):
    """Offline Q/A from the chatterbot-corpus English YAML files (21 categories). Every turn
    of a conversation is a question answered by the next turn (2,393 pairs). Partition key:
    the category (the YAML file name). ``data_path``: a folder of YAML files or one file."""

    name = "chatterbot-qa"

    def load(self, data_path: str | None = None, seed: int = 0, max_examples: int | None = None) -> TaskData:
        import yaml  # noqa: PLC0415

        path = require_path(_default_chatterbot_path() if data_path is None else str(data_path))
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.yml"))
                                                           + glob.glob(os.path.join(path, "*.yaml")))
        if not files:
            raise DataError(f"{path}: no .yml/.yaml files found; pass a folder of chatterbot YAML files.")
        examples = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
            if not isinstance(doc, dict) or "conversations" not in doc:
                found = list(doc) if isinstance(doc, dict) else type(doc).__name__
                raise DataError(f"{f}: missing key 'conversations'; keys found: {found}; expected: ['conversations'].")
            cat = os.path.splitext(os.path.basename(f))[0]
            for conv in doc["conversations"] or []:
                turns = [str(t).strip() for t in conv if t is not None]
                for q, a in zip(turns, turns[1:]):
                    if q and a:
                        examples.append({"question": q, "answer": a, "category": cat})
        if not examples:
            raise DataError(f"{path}: the YAML files hold no question/answer pairs.")
        train, test = finish_splits(examples, None, seed, max_examples, path)
        return TaskData(train, test, [e["category"] for e in train], None, {"source": path},
                        test_partition_keys=[e["category"] for e in test])
