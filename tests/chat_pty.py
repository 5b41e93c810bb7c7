"""Drives `moerun chat` in a pseudo-terminal, as a person would (issue 5).

Usage: python3 chat_pty.py MOERUN_BINARY

Session 1: start, ask, see the answer streamed and the one-line summary, /stats, /quit.
Session 2: an endless answer (--ignore-eos) stopped with Ctrl-C; the program stays; Ctrl-C at the
prompt only prints a hint; Ctrl-D leaves. Every wait is bounded.
"""

import os
import pty
import select
import sys
import time

TIMEOUT = 60.0


class Term:
    def __init__(self, argv):
        env = dict(os.environ, TERM="xterm", COLUMNS="200", LINES="50")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(argv[0], argv, env)
        self.out = ""
        self.answered_cpr = 0

    def read_some(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return None
        if not data:
            return None
        self.out += data.decode("utf-8", "replace")
        # rustyline asks where the cursor is (ESC[6n); answer like a terminal would.
        while self.out.count("\x1b[6n") > self.answered_cpr:
            os.write(self.fd, b"\x1b[1;1R")
            self.answered_cpr += 1
        return True

    def expect(self, text, since=0):
        """Waits until `text` appears in the output after position `since`; returns its end."""
        deadline = time.time() + TIMEOUT
        while True:
            at = self.out.find(text, since)
            if at >= 0:
                return at + len(text)
            left = deadline - time.time()
            if left <= 0 or self.read_some(left) is None:
                sys.exit(f"FAIL: did not see {text!r}; output so far:\n{self.out}")

    def send(self, data):
        os.write(self.fd, data.encode())

    def wait_exit(self):
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            self.read_some(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        sys.exit(f"FAIL: the chat did not exit; output:\n{self.out}")


def session_one(binary):
    t = Term([binary, "chat", "--temp", "0", "-t", "1"])
    t.expect("moerun chat")
    pos = t.expect(">>> ")
    t.send("What is a trait?\r")
    end = t.expect("tok/s", pos)
    answer = t.out[pos:end]
    assert "trait" in answer.split("What is a trait?", 1)[-1], f"no answer about traits: {answer!r}"
    assert "expert hit rate" in t.out[pos:], t.out
    pos = t.expect(">>> ", end)
    t.send("/stats\r")
    pos = t.expect("expert cache", pos)
    assert "2 per token" in t.out and "active per token" in t.out, t.out
    pos = t.expect(">>> ", pos)
    t.send("/quit\r")
    code = t.wait_exit()
    assert code == 0, f"exit code {code}; output:\n{t.out}"
    print("chat session 1: ok (ask, streamed answer, summary, /stats, /quit)")


def session_two(binary):
    # A 2048-token context and no end-of-turn: the answer runs for seconds unless stopped.
    t = Term([binary, "chat", "--temp", "0", "-t", "1", "--ignore-eos", "-c", "2048"])
    pos = t.expect(">>> ")
    t.send("Tell me about the borrow checker\r")
    # Wait for some answer text, then press Ctrl-C.
    pos = t.expect("Tell me about the borrow checker", pos)
    deadline = time.time() + TIMEOUT
    while len(t.out) - pos < 40 and time.time() < deadline:
        t.read_some(0.5)
    t.send("\x03")
    pos = t.expect("(stopped)", pos)
    pos = t.expect(">>> ", pos)
    # Ctrl-C at the prompt does not quit.
    t.send("\x03")
    pos = t.expect("/quit or Ctrl-D", pos)
    pos = t.expect(">>> ", pos)
    t.send("\x04")
    code = t.wait_exit()
    assert code == 0, f"exit code {code}; output:\n{t.out}"
    print("chat session 2: ok (Ctrl-C stops the answer, not the program; Ctrl-D leaves)")


if __name__ == "__main__":
    session_one(sys.argv[1])
    session_two(sys.argv[1])
