"""Reports built from a finished search's records: leaderboard, reruns, paper table, compare, plots."""
