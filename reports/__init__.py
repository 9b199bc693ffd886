"""Tables, charts and the CI accuracy report (pandas + matplotlib). Depends on peftcalc and on the
harness's result files (JSON lines of measure.run.measure_one), never the other way round; importing
this package imports nothing heavy.

DataFrames (Python API):
    reports.rows.load_rows(paths)                    every measured row, predicted now, signed error
    reports.accuracy.error_table(df, by=...)         median / worst |error| per group
    reports.trainable.trainable_frame(model)         every method on a real model vs published typical ranges
    reports.storage_report.storage_frame(model, T)   storage vs task count (one base + T task files)
    reports.breakdown.breakdown_frame(model, bs)     memory components per method, batch and sequence
    reports.vlm.vlm_frame()                          a 7B VLM memory breakdown recomputed (llava-1.5-7b)
    reports.dist_chart.dist_frame(model, method)     rank 0 per GPU vs GPUs per strategy (dist_chart: the chart)
Strings and files for the CLI: reports.cli_api. CI: ``python -m reports.ci_report``.
"""
