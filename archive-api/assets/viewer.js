// Strata archive viewer: the little the pages need beyond HTML. No data is read or sent here.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // The print view's button.
  document.querySelectorAll('[data-action="print"]').forEach(function (button) {
    button.addEventListener("click", function () { window.print(); });
  });
  // The break-the-glass dialog takes the keyboard's focus, so it is answered without a mouse.
  var reason = document.getElementById("btg-reason");
  if (reason) { reason.focus(); }
});
