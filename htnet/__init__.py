"""HTNet micro-expression recognition under leave-one-subject-out cross-validation."""
