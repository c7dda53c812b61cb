"""``vtok.eval``: what a method saves and what it costs -- FLOPs (``flops``), latency (``latency``), accuracy
comparisons (``runner``, ``datasets``, ``harnesses``), the offline demo VLM (``offline``, ``demo``) and the
``vtok eval`` command line (``cli``)."""
