"""Evaluation: ranking, classification and regression metrics (DESIGN.md section 7)."""
from .metrics import (DEFAULT_KS, RankingAccumulator, auc, embedding_score_fn, evaluate_full_ranking, gauc,
                      hit_rate_at_k, like_metrics, mae, mrr_at_k, ndcg_at_k, ranking_metrics, rating_metrics, rmse,
                      target_ranks)
from .model_eval import evaluate_model, popularity_baseline, model_ranks

__all__ = ["DEFAULT_KS", "RankingAccumulator", "auc", "embedding_score_fn", "evaluate_full_ranking", "gauc",
           "hit_rate_at_k", "like_metrics", "mae", "mrr_at_k", "ndcg_at_k", "ranking_metrics", "rating_metrics",
           "rmse", "target_ranks", "evaluate_model", "popularity_baseline", "model_ranks"]
