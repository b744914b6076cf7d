"""mmalign.eval: exact metrics, the shapes-world evaluation runner and the HTML report.

- ``metrics.py``: pure metric functions (CHAIR, coverage, POPE, well-formedness, QA / deceptive accuracy);
- ``runner.py``: ``evaluate_world(model, processor, scenes, ...)`` and ``save_eval``;
- ``report.py``: ``write_report(run_dir_or_stages, out_path)``.
"""
