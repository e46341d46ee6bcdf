"""Reading from and writing back to a PACS: DICOMweb access (dicomweb.py) and the DICOM SR of a result (report.py)."""
