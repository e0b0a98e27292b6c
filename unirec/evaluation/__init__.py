"""Evaluation: ranking, classification and regression metrics, a model on a split, and paired comparisons
of runs (docs/protocol.md)."""
from .compare import compare_runs, format_comparison, paired_bootstrap, per_user_metric
from .metrics import (DEFAULT_KS, RankingAccumulator, auc, embedding_score_fn, evaluate_full_ranking, gauc,
                      hit_rate_at_k, like_metrics, mae, mrr_at_k, ndcg_at_k, ranking_metrics, rating_metrics, rmse,
                      target_ranks)
from .model_eval import (evaluate_cases, evaluate_cold, evaluate_model, evaluate_split, format_metrics,
                         popularity_baseline)

__all__ = ["compare_runs", "format_comparison", "paired_bootstrap", "per_user_metric", "DEFAULT_KS",
           "RankingAccumulator", "auc", "embedding_score_fn", "evaluate_full_ranking", "gauc", "hit_rate_at_k",
           "like_metrics", "mae", "mrr_at_k", "ndcg_at_k", "ranking_metrics", "rating_metrics", "rmse",
           "target_ranks", "evaluate_cases", "evaluate_cold", "evaluate_model", "evaluate_split", "format_metrics",
           "popularity_baseline"]
