"""Security analytics over the audit log (DESIGN §11): the anomaly detectors, their
findings and settings (``detectors.py``, ``escalation.py``, ``findings.py``,
``settings.py``), and reports of policy coverage, audit completeness and least privilege
(``report.py``). The control plane's runner (``server/analytics.py``) feeds the
detectors the log in order."""
