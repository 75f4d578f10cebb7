"""Security analytics over the audit log: detectors, findings, their settings."""
