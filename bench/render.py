"""Micro-benchmark of rendering alone, on one core: personalised messages per second.

Compares, for the same ~2 KB HTML+text campaign (``bench.campaign``):

- ``mailers``: :class:`mailers_runtime.message.CompiledMessage` (compiled once, spliced per
  recipient), with templates made only of ``{{ name }}`` holes;
- ``mailers-jinja``: the same with one Jinja filter per field (``{{ name | title }}``),
  which sends every field through Jinja's compiled code instead of the splice path;
- ``emailmessage``: a fresh ``email.message.EmailMessage`` per recipient, serialised
  with ``as_bytes()`` (the naive way);
- ``mailers+rsa2048`` and ``mailers+ed25519`` (with ``--dkim``): ``mailers`` plus a
  DKIM signature (:class:`sender_node.dkim.DkimSigner`) with a fresh RSA-2048 or Ed25519
  key, written as PEM to a temporary directory and loaded with ``from_files``.

Usage: ``python -m bench.render [--messages N] [--repeat R] [--dkim]``. Prints the
median of R runs per variant. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from bench import campaign
from mailers_runtime.message import CompiledMessage, Content, Header, Mailbox, MessageSigner

TARGET_PER_S = 20_000


def content(jinja: bool = False) -> Content:
    """The benchmark campaign; ``jinja`` adds a filter to every variable."""

    def adapt(source: str) -> str:
        return source.replace("{{ name }}", "{{ name | title }}") if jinja else source

    return Content(
        sender=Mailbox(campaign.SENDER, campaign.SENDER_NAME),
        subject=adapt(campaign.SUBJECT),
        text_body=adapt(campaign.TEXT),
        html_body=adapt(campaign.HTML),
        headers=tuple(Header(name, value) for name, value in campaign.HEADERS),
        unsubscribe_url=campaign.UNSUBSCRIBE_URL,
    )


def ours(compiled: CompiledMessage) -> Callable[[int], bytes]:
    def render(i: int) -> bytes:
        email, name, variables = campaign.recipient(i)
        return compiled.render(
            index=i, email=email, name=name, variables=variables, date=datetime.now(UTC)
        )

    return render


def email_message(i: int) -> bytes:
    """The naive way: the same message built as an EmailMessage per recipient."""
    email, name, variables = campaign.recipient(i)
    values = {"name": name, "email": email, **variables}

    def fill(source: str) -> str:
        for key, value in values.items():
            source = source.replace("{{ " + key + " }}", value)
        return source

    message = EmailMessage()
    message["From"] = f"{campaign.SENDER_NAME} <{campaign.SENDER}>"
    message["To"] = f"{name} <{email}>"
    message["Subject"] = fill(campaign.SUBJECT)
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = f"<bench.{i}@example.com>"
    for header, value in campaign.HEADERS:
        message[header] = value
    message["List-Unsubscribe"] = f"<{fill(campaign.UNSUBSCRIBE_URL)}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(fill(campaign.TEXT))
    message.add_alternative(fill(campaign.HTML), subtype="html")
    return message.as_bytes()


def measure(render: Callable[[int], bytes], count: int, repeat: int) -> tuple[float, int]:
    """Median messages/s over ``repeat`` runs of ``count`` messages, and the message size."""
    rates = []
    size = len(render(0))
    for _ in range(repeat):
        start = time.process_time()
        for i in range(count):
            render(i)
        rates.append(count / max(time.process_time() - start, 1e-9))
    return statistics.median(rates), size


def dkim_signer(workdir: Path, algorithm: str) -> MessageSigner:
    """A signer for the campaign's domain with a fresh ``rsa2048`` or ``ed25519`` key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from sender_node.dkim import DkimSigner

    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "rsa2048"
        else ed25519.Ed25519PrivateKey.generate()
    )
    key = workdir / f"bench-dkim-{algorithm}.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return DkimSigner.from_files({campaign.SENDER.rpartition("@")[2]: ("bench", key)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.render", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--dkim", action="store_true", help="also measure DKIM signing")
    args = parser.parse_args(argv)
    count = max(1, args.messages)
    variants: list[tuple[str, Callable[[int], bytes], int]] = [
        ("mailers", ours(CompiledMessage("bench-job", content())), count),
        ("mailers-jinja", ours(CompiledMessage("bench-job", content(jinja=True))), count),
        # The naive way is ~50x slower: fewer messages keep the run short.
        ("emailmessage", email_message, max(1, count // 10)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in ("rsa2048", "ed25519") if args.dkim else ():
            signer = dkim_signer(Path(tmp), algorithm)
            signed = CompiledMessage("bench-job", content(), signer=signer)
            # RSA signing is ~10x rendering: fewer messages keep the run short.
            n = max(1, count // (10 if algorithm == "rsa2048" else 2))
            variants.append((f"mailers+{algorithm}", ours(signed), n))
        print(f"rendering one ~2 KB personalised HTML+text message, one core, CPU time, "
              f"median of {args.repeat}")  # fmt: skip
        print(f"{'variant':15} {'msgs/s':>9} {'us/msg':>8} {'bytes':>6} {'messages':>9}")
        results = {}
        for label, render, n in variants:
            rate, size = measure(render, n, args.repeat)
            results[label] = rate
            print(f"{label:15} {rate:9.0f} {1e6 / rate:8.1f} {size:6d} {n:9d}", flush=True)
    for label in (label for label in results if label.startswith("mailers+")):
        sign_us = 1e6 / results[label] - 1e6 / results["mailers"]
        print(f"{label}: signing alone ~{sign_us:.0f} us/msg, {results[label]:,.0f} signed msgs/s")
    speedup = results["mailers"] / results["emailmessage"]
    verdict = "meets" if results["mailers"] >= TARGET_PER_S else "MISSES"
    print(f"mailers is {speedup:.0f}x EmailMessage; {verdict} the {TARGET_PER_S:,}/s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
