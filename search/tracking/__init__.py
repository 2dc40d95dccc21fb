"""MLflow tracking of a search: the record schema and reader, the store, the writer, recovery."""
from search.tracking.schema import newest_run_ids, provenance, provenance_tags, ranked, runs, trial_table
from search.tracking.store import (check_reachable, client_for, ensure_experiment, mlflow_errors, retry,
                                   short_reason, unreachable, unreachable_message)
from search.tracking.recovery import backfill, mark_interrupted, replay_results
from search.tracking.writer import (MlflowTracking, finish_parent_run, log_metrics, log_params, set_tags,
                                    start_parent_run)

__all__ = ["MlflowTracking", "backfill", "check_reachable", "client_for", "ensure_experiment",
           "finish_parent_run", "log_metrics", "log_params", "mark_interrupted", "mlflow_errors",
           "newest_run_ids", "provenance", "provenance_tags", "ranked", "replay_results", "retry", "runs",
           "set_tags", "short_reason",
           "start_parent_run", "trial_table", "unreachable", "unreachable_message"]
