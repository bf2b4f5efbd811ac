"""What a volume task's result becomes: files (`files`: label maps, per-segment NIfTI, previews, findings),
DICOM SEG and SR (`dicom_out`, codes in `terminology`), segment colours (`colors`), the multi-label view of
overlapping segments (`overlaps`), measurements (`quantify`), evaluation against a reference mask (`evaluate`)."""
