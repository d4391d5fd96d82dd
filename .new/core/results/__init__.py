"""What a run's files say, for people: the statistics, the report and everything built from it.
Pure functions over run folders and predictions; no streamlit. Floors, lowest first:

- stats.py: the statistics (Wilson and bootstrap intervals, McNemar, F1, calibration, power);
- slices.py: views of the examples (per-class, label-noise hints, forgetting, seed agreement);
- sections.py: the report's statistics sections (what changed, how sure we can be);
- render.py: a report as Markdown or HTML, and the formatted rows the Report page shows;
- report.py: the report of one run (report.json), rebuilt from its folder alone;
- seeds.py: several seeds of one configuration as one result;
- compare.py: runs side by side (the Compare page);
- bundle.py: a run's reproducibility bundle (one zip).
"""
