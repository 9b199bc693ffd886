"""Tables, charts and the CI accuracy report (pandas + matplotlib). Depends on peftcalc and on the
harness's result files (JSON lines of measure.run.measure_one), never the other way round; importing
this package imports nothing heavy.

DataFrames (Python API):
    reports.rows.load_rows(paths)                    every measured row, predicted now, signed error
    reports.accuracy.error_table(df, by=...)         median / worst |error| per group
    reports.trainable.trainable_frame(model)         seeds 004/000 method table for a real model
    reports.storage_report.storage_frame(model, T)   storage vs task count (seed 003)
    reports.breakdown.breakdown_frame(model, bs)     memory components per method, batch and sequence
    reports.vlm.vlm_frame()                          seed 001's 7B VLM table recomputed
Strings and files for the CLI: reports.cli_api. CI: ``python -m reports.ci_report``.
"""
