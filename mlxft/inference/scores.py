"""Scores of generated text against references, for `mlxft evaluate`.

From well-kept libraries (the `eval` extra): sacrebleu's corpus BLEU with its `char` tokenizer,
rouge-score's ROUGE-L F1 with a tokenizer that splits characters; both therefore work for
Chinese or any unsegmented script.  Characters are compared as written (case kept), whitespace is
not a token.  Exact match and its normalized form are plain string comparisons.
"""

from __future__ import annotations

import unicodedata

from mlxft.errors import UserError

# what the report says each score is (it travels in the JSON report)
SCORING = {
    "bleu": "sacrebleu corpus_bleu, tokenize='char'",
    "rouge_l": "rouge-score RougeScorer(['rougeL']), F1, non-space characters as tokens",
    "normalized_exact_match": "NFKC, casefold, punctuation removed, whitespace collapsed",
}


def normalize(text: str) -> str:
    """For the normalized exact match: NFKC, case-folded, Unicode punctuation dropped (SQuAD's
    rule, without its English article list), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


class CharTokenizer:
    """rouge-score's tokenizer interface (`tokenize(text) -> tokens`) over characters: its default
    tokenizer keeps only ASCII letters and digits, so Chinese text would score 0."""

    def tokenize(self, text: str) -> list:
        return [c for c in text if not c.isspace()]


def scorers() -> tuple:
    """(sacrebleu, a ROUGE-L scorer); a missing extra is one line naming it."""
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError(
            "mlxft evaluate needs sacrebleu and rouge-score: pip install 'mlxft[eval]'"
        ) from None
    return sacrebleu, rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())


def score(predictions: list, references: list) -> tuple:
    """({metric: corpus score in %}, [{metric: per-example score in %}]).  BLEU is sacrebleu's
    corpus BLEU (`char` tokenization) and per example its sentence BLEU; ROUGE-L is the mean F1."""
    sacrebleu, rouge = scorers()
    rows = []
    for pred, ref in zip(predictions, references):
        pred, ref = pred.strip(), ref.strip()
        rows.append(
            {
                "exact_match": 100.0 * (pred == ref),
                "normalized_exact_match": 100.0 * (normalize(pred) == normalize(ref)),
                "rouge_l": 100.0 * rouge.score(ref, pred)["rougeL"].fmeasure,
                "bleu": sacrebleu.sentence_bleu(pred, [ref], tokenize="char").score,
            }
        )
    n = max(len(rows), 1)
    bleu = sacrebleu.corpus_bleu(
        [p.strip() for p in predictions], [[r.strip() for r in references]], tokenize="char"
    )
    summary = {
        key: sum(r[key] for r in rows) / n
        for key in ("exact_match", "normalized_exact_match", "rouge_l")
    }
    summary["bleu"] = bleu.score
    return summary, rows
