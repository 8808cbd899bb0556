"""C-FIND on the index: the key table (attributes), matching terms and their SQL
(conditions), and the one SELECT that answers a query (search). The DICOM side
(levels of each model, what a request value means, response datasets, failure
statuses) is appliance/services/query/."""
