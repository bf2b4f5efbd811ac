"""Volumes in: files read (`io`), an untrusted file's header parsed from its own bytes (`headers`), checked DICOM
series (`dicom_series`), a synthetic CT-like volume for benchmarks (`synthetic`)."""
