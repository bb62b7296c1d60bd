"""A LangGraph tool-using agent over `ChatParrot`: the model calls a tool, the tool runs, the
model answers. Each graph run is one Parrot session (its thread id is the session hint), so
the answer turn forks the tool-call turn's KV and computes only the tool's result and after.

    python examples/langgraph_agent.py [--url URL] ["question"]

Without --url it starts an embedded runtime on the embedded model. The graph is LangGraph's
ReAct loop written as a StateGraph (agent node, ToolNode, an edge back while the model calls
tools) with one policy a 135M model can follow: until a tool has answered, the model must
call one (`tool_choice="required"`, constrained to a valid call); after that it answers in
text (`"none"`).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from pydantic import BaseModel, Field

import parrot_actors as pa
from parrot_actors.integrations.langchain import ChatParrot


class MultiplyArgs(BaseModel):
    """Two small integers."""

    a: int = Field(ge=0, le=999)
    b: int = Field(ge=0, le=999)


@tool(args_schema=MultiplyArgs)
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def build_agent(llm: ChatParrot, tools: Sequence[BaseTool]) -> Any:
    """The compiled graph: `await graph.ainvoke({"messages": [...]}, config)`."""

    async def agent(state: MessagesState) -> dict[str, list[Any]]:
        answered = isinstance(state["messages"][-1], ToolMessage)
        model = llm.bind_tools(tools, tool_choice="none" if answered else "required")
        return {"messages": [await model.ainvoke(state["messages"])]}

    def route(state: MessagesState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else END

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode(list(tools)))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph.compile()


async def run(llm: ChatParrot, question: str, thread: str) -> list[Any]:
    """One agent run; returns its messages."""
    graph = build_agent(llm, [multiply])
    out = await graph.ainvoke(
        {"messages": [("user", question)]}, config={"configurable": {"thread_id": thread}}
    )
    return list(out["messages"])


def show(messages: list[Any]) -> None:
    """Print each message of a run on one line."""
    for m in messages:
        calls = [f"{c['name']}({c['args']})" for c in getattr(m, "tool_calls", [])]
        print(f"{type(m).__name__}: {str(m.content).strip()[:200]}", *calls)


async def main() -> None:
    """Run the agent once, embedded or against `--url`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service (default: an embedded runtime)")
    parser.add_argument("question", nargs="?", default="What is 12 times 34?")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.url:
        llm = ChatParrot(url=args.url, temperature=0, max_tokens=args.max_tokens)
        show(await run(llm, args.question, "agent-run-1"))
        return
    async with pa.Runtime(engines=[pa.EngineConfig()]) as rt:
        llm = ChatParrot(runtime=rt, temperature=0, max_tokens=args.max_tokens)
        show(await run(llm, args.question, "agent-run-1"))


if __name__ == "__main__":
    asyncio.run(main())
