"""Top-k accuracy as an `evaluate` metric module, shipped with hf_vitprune and loaded by local path.

`evaluate.load("accuracy")` needs the Hub; this script is loaded with
`evaluate.load(hf_vitprune.metrics.TOP_K_ACCURACY)` and works offline. It imports only `datasets` and `evaluate`
because `evaluate` copies it into its module cache and imports it from there.
"""

import datasets
import evaluate

_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference label is among the k labels the model ranks highest.
Top-1 accuracy is plain accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each example, class indices ranked from most to least likely
        (e.g. `logits.topk(5).indices`); at least max(k) of them.
    references (`list` of `int`): the true class index of each example.
    k (`int` or `list` of `int`, defaults to 1): the k, or several k, to evaluate.

Returns:
    `top_{k}_accuracy` (`float` in [0, 1]) for every requested k.

Examples:
    >>> metric = evaluate.load("path/to/top_k_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=[1, 2])
    {'top_1_accuracy': 0.5, 'top_2_accuracy': 1.0}
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=1):
        ks = [k] if isinstance(k, int) else list(k)
        if not ks or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ks):
            raise ValueError(f"k must be a positive integer or a list of them, got {k!r}.")
        if not references:
            raise ValueError("top_k_accuracy needs at least one example.")
        shortest = min(len(ranked) for ranked in predictions)
        if max(ks) > shortest:
            raise ValueError(f"k = {max(ks)} needs at least {max(ks)} ranked labels per prediction, got {shortest}.")
        hits = {v: sum(ref in ranked[:v] for ranked, ref in zip(predictions, references)) for v in ks}
        return {f"top_{v}_accuracy": hits[v] / len(references) for v in ks}
