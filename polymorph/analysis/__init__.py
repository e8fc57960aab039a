"""Cross-seed analysis: a shared context plus one callback per question (see conf/analysis/)."""
