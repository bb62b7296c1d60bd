"""Integrations with agent frameworks (optional extras): `integrations.langchain` (the
`langchain` extra) gives LangChain and LangGraph apps a chat model over this service."""
