"""Security analytics over the audit log (DESIGN §11): reports of policy coverage, audit
completeness and least privilege (``report.py``)."""
