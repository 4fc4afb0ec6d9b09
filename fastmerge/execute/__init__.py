"""Running a plan: the reader -> compute -> writer pipeline (:mod:`.executor`) and the writers its
results go to (:mod:`.sinks`: one model, or a multi-task store chosen by the method)."""
