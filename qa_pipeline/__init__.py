"""qa_pipeline: question/answer datasets from your own documents with a self-hosted LLM."""

__version__ = "0.1.0"
