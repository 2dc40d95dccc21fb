"""MLflow tracking of a search: the record schema and reader, the store, the writer, the sync from Ray's results."""
from search.tracking.schema import (newest_run_ids, provenance, provenance_tags, ranked, runs, sampled_names,
                                   trial_table)
from search.tracking.store import (check_reachable, client_for, ensure_experiment, mlflow_errors, retry,
                                   short_reason, unreachable, unreachable_message)
from search.tracking.writer import (MlflowTracking, finish_parent_run, log_dataset, log_metrics, log_params,
                                    mark_interrupted, set_tags, start_parent_run, sync)

__all__ = ["MlflowTracking", "check_reachable", "client_for", "ensure_experiment", "finish_parent_run",
           "log_dataset", "log_metrics", "log_params", "mark_interrupted", "mlflow_errors", "newest_run_ids",
           "provenance", "provenance_tags", "ranked", "retry", "runs", "sampled_names", "set_tags", "short_reason",
           "start_parent_run", "sync", "trial_table", "unreachable", "unreachable_message"]
