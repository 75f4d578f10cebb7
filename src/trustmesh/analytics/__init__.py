"""Security analytics over the audit log (DESIGN §11): the anomaly detectors, their
findings and settings (``detectors.py``, ``findings.py``, ``settings.py``), and reports
of policy coverage, audit completeness and least privilege (``report.py``)."""
