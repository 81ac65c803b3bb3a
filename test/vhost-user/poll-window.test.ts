/**
 * The queue worker's poll window (QEMU's adjust_polling_time rule): it follows the time from the
 * end of a batch (the start of the poll) to the next kick.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { PollWindow } from "../../src/vhost-user/backend/poll-window.js";

test("a kick that came after the window but within the maximum doubles it, up to the maximum", () => {
  const w = new PollWindow(128);
  assert.equal(w.us, 8);
  const seen: number[] = [];
  for (let i = 0; i < 6; i++) {
    w.afterSleep(60); // a driver that comes back 60 µs after the last completion
    seen.push(w.us);
  }
  assert.deepEqual(seen, [16, 32, 64, 64, 64, 64], "grows until it covers the 60 µs, then stays");
  for (let i = 0; i < 4; i++) w.afterSleep(127);
  assert.equal(w.us, 128, "never past the maximum");
});

test("a kick within the window changes nothing; one past the maximum (an idle driver) halves it", () => {
  const w = new PollWindow(32);
  w.afterSleep(20);
  w.afterSleep(20);
  assert.equal(w.us, 32);
  w.afterSleep(31);
  assert.equal(w.us, 32);
  const seen: number[] = [];
  for (let i = 0; i < 7; i++) {
    w.afterSleep(5_000_000);
    seen.push(w.us);
  }
  assert.deepEqual(seen, [16, 8, 4, 2, 1, 1, 1], "an idle queue polls for next to nothing");
  w.afterSleep(3);
  assert.equal(w.us, 2, "and grows again when the driver comes back");
});

test("a full-length poll that failed halves the window: it stays long only while polling catches the driver", () => {
  const w = new PollWindow(64);
  for (let i = 0; i < 3; i++) w.afterSleep(50);
  assert.equal(w.us, 64);
  // The driver cannot run (busy CPUs): the worker polled its 64 µs for nothing, then slept.
  const seen: number[] = [];
  for (let i = 0; i < 4; i++) {
    w.afterSleep(w.us + 10);
    seen.push(w.us);
  }
  assert.deepEqual(seen, [32, 64, 32, 64], "never stuck at the maximum while polls fail");
  for (let i = 0; i < 3; i++) w.afterSleep(200);
  assert.equal(w.us, 8);
});

test("VMSHIFT_POLL_US=0 (or nonsense) disables polling for good", () => {
  for (const max of [0, -5, Number.NaN]) {
    const w = new PollWindow(max);
    assert.equal(w.us, 0);
    w.afterSleep(10);
    w.afterSleep(1e9);
    assert.equal(w.us, 0, `${max}`);
  }
  const small = new PollWindow(4);
  assert.equal(small.us, 4, "starts at 8 µs or the maximum, whichever is smaller");
});
