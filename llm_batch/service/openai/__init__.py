"""The OpenAI-compatible Files and Batch APIs: a batch is a job underneath.

    schemas.py   the API's objects (file, batch, list pages), field for field OpenAI's
    store.py     the ``files`` and ``batches`` tables' queries (the tables are in service.store)
    upload.py    a multipart upload streamed to disk, its size capped while it streams
    convert.py   validating: the JSONL input, line by line, into Parquet inputs and job specs
    output.py    finalizing: the jobs' Parquet outputs into OpenAI output and error files
    runner.py    the thread that moves batches through their statuses (survives restarts)

The routes are ``service/api/routes/files.py`` and ``batches.py``.
"""
