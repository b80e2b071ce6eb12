"""The standardized benchmark behind ``zoo bench`` (DESIGN.md section 7).

Modules, one concern each: `suite` (suite files, expansion into runs), `execute` (runs, resume),
`worker` (one run in a fresh process), `stats` (IQM, stratified bootstrap, probability of improvement),
`aggregate` (records over seeds), `exact_checks` (exact frontier, best-of-N known results), `report`
(report.md), `plots` (PNG figures), `harness` (`run_bench`: all of it in order), `command` (what
``zoo bench`` does with its options).
"""
